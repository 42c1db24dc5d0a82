"""How good is the ETA orchd shows for a real training run? The main job's training (the Burgers
neural operator on the local backend, slowed to a realistic pace) is run under orchd, ticking
every few seconds like the daemon; every tick's estimate is kept, and once the run ends each
is compared with the time that really remained.

    python bench/bench_eta.py [--epochs 6] [--step-delay 0.15] [--tick 3]

Goal (issue #13): the first estimate made after 30 % of the steps is within 20 % of the real
remaining time, and the ETA shrinks as the run goes. On the same run, `whatif` at 30 % (its
"continue" against what really remained) and, at the end, `report` as HTML with its PNG decoded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator import service  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--step-delay", type=float, default=0.15)
    ap.add_argument("--tick", type=float, default=3.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "home").mkdir()
        spec = t / "eta.yaml"
        spec.write_text(f"name: eta-bench\ncommand: python -m workloads.burgers --epochs {args.epochs} "
                        f"--step-delay {args.step_delay} --ckpt-dir {t}/ckpt\nworkdir: {ROOT}\n"
                        "success: val_loss < 0.34 by step 270\n")
        app = service.open_app({**os.environ, "ORCHD_HOME": str(t / "home")})
        (job,) = service.submit(app, spec)
        estimates = []  # (time, step, total, eta_end_s)
        whatif = None  # (time, WhatIf) at the first estimate after 30 % of the steps
        while True:
            app.ticker.tick(lock_timeout=5)
            (row,) = [r for r in service.job_summaries(app, include_all=True) if r["id"] == job]
            p = row["progress"]
            if p and p["eta_end_s"] is not None:
                estimates.append((time.time(), p["step"], p["total_steps"], p["eta_end_s"]))
                if whatif is None and p["total_steps"] and p["step"] >= 0.3 * p["total_steps"]:
                    whatif = (time.time(), service.whatif(app, job, fix_s=60, queue_s=0))
            if row["state"] not in ("PENDING", "RUNNING"):
                break
            time.sleep(args.tick)
        ended = service.job_detail(app, job)["ended_at"]
        html = _report_html(app, job)
    if not estimates:
        print("no estimate was made")
        return
    total = estimates[-1][2]
    print(f"run: {total} steps, {len(estimates)} estimates, tick {args.tick:.0f} s")
    print(f"{'step':>6} {'ETA':>8} {'real':>8} {'error':>7}")
    for at, step, _, eta in estimates[:: max(1, len(estimates) // 12)]:
        real = ended - at
        print(f"{step:>6} {eta:>7.0f}s {real:>7.0f}s {100 * (eta - real) / max(real, 1e-9):>+6.0f}%")
    first = next(((at, s, eta) for at, s, _, eta in estimates if total and s >= 0.3 * total), None)
    if first:
        real = ended - first[0]
        err = abs(first[2] - real) / real
        print(f"first estimate after 30 % of the steps (step {first[1]}): {first[2]:.0f}s vs {real:.0f}s real: "
              f"{100 * err:.1f}% off (goal: within 20 %) {'OK' if err <= 0.2 else 'MISSED'}")
    shrinking = estimates[-1][3] < estimates[0][3]
    print(f"ETA shrinks: {estimates[0][3]:.0f}s -> {estimates[-1][3]:.0f}s ({'OK' if shrinking else 'NO'})")
    if whatif:
        at, w = whatif
        real = ended - at
        print(f"whatif at step {w.step}: continue {w.cont.total_s:.0f}s (really {real:.0f}s, "
              f"{100 * (w.cont.total_s - real) / real:+.0f}%), restart with a 1-minute fix {w.restart.total_s:.0f}s: "
              f"{w.faster} sooner by {w.saves_s:.0f}s")
    print(html)


def _report_html(app: service.App, job: int) -> str:
    """Write the job's HTML report, decode its embedded PNG; a line of figures."""
    import base64
    import io
    import re

    from matplotlib.image import imread

    from orchestrator.report import html_page

    (rep,) = service.reports(app, [job])
    page = html_page([rep], f"job {job}", {job: rep.plot()})
    (b64,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    pixels = imread(io.BytesIO(base64.b64decode(b64)), format="png")
    return (f"report: {len(page) / 1024:.0f} KiB of HTML, plot {pixels.shape[1]}x{pixels.shape[0]} px decoded; "
            f"{rep.headline}")


if __name__ == "__main__":
    main()
