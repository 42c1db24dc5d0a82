"""How good is the learning-curve forecast? Over real training curves (tests/data/curves/: the
Burgers workload at several learning rates, widths, depths and seeds, some missing the target),
the verdict made at 40 % of the steps is compared with what happened.

    python bench/bench_forecast.py [--target 0.34] [--at 0.4]

Prints each curve's forecast at that point against its real value at the target step, the
confusion table (verdict × met / missed), the median absolute error of the predicted value,
and whether a ``cancel_if: forecast misses success`` would ever have fired (at any point) on a
curve that met its target (goal: never).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator.conditions import parse_condition  # noqa: E402
from orchestrator.forecast import forecast  # noqa: E402
from orchestrator.logparse import LogParser  # noqa: E402


def curve(path: Path) -> list[tuple[int, float]]:
    events, _ = LogParser(["val_loss"]).feed(path.read_bytes(), 0, final=True)
    return [(e.step, e.value) for e in events if e.name == "val_loss" and e.step]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.34)
    ap.add_argument("--at", type=float, default=0.4, help="share of the steps seen when the verdict is made")
    args = ap.parse_args()
    table: Counter[tuple[str, str]] = Counter()
    errors, false_cancels = [], []
    print(f"{'curve':<28} {'forecast':>9} {'band':>17} {'real':>7}  verdict -> outcome")
    for path in sorted((ROOT / "tests" / "data" / "curves").glob("*.log")):
        pts = curve(path)
        end = max(s for s, _ in pts)
        real = next(v for s, v in pts if s == end)
        cond = parse_condition(f"val_loss < {args.target} by step {end}")
        outcome = "met" if min(v for _, v in pts) < args.target else "missed"
        seen = [p for p in pts if p[0] <= args.at * end]
        f = forecast(seen, cond)
        if f is None:
            print(f"{path.stem:<28} no forecast from {len(seen)} samples")
            continue
        table[(f.verdict, outcome)] += 1
        errors.append(abs(f.value - real))
        band = f"[{f.low:.3f},{f.high:.3f}]"
        print(f"{path.stem:<28} {f.value:>9.4f} {band:>17} {real:>7.4f}  {f.verdict} -> {outcome}")
        if outcome == "met":  # would the cancel have fired at any point of the run?
            for i in range(5, len(pts)):
                g = forecast(pts[:i], cond)
                if g is not None and g.verdict == "will miss":
                    false_cancels.append(f"{path.stem} at step {pts[i - 1][0]}")
                    break
    print(f"\nconfusion at {args.at:.0%} of the steps (rows: verdict, columns: outcome)")
    print(f"{'':<10} {'met':>5} {'missed':>7}")
    for v in ("on track", "at risk", "will miss"):
        print(f"{v:<10} {table[(v, 'met')]:>5} {table[(v, 'missed')]:>7}")
    if errors:
        print(f"median absolute error of the predicted val_loss: {statistics.median(errors):.4f}")
    print("a 'forecast misses success' cancel on a curve that met its target: "
          + (", ".join(false_cancels) if false_cancels else "never (goal: never)"))


if __name__ == "__main__":
    main()
