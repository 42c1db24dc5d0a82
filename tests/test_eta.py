"""The progress model (orchestrator/eta.py) on synthetic timelines with a known rate, validation
cadence and total, and on the repository's real logs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.eta import estimate
from orchestrator.logparse import LogParser

DATA = Path(__file__).parent / "data"


def timeline(steps: int, sec_per_step: float, val_every: int, val_seconds: float, t0: float = 1000.0,
             tick: float | None = None) -> list[tuple[float, int, str]]:
    """Samples of a run: a train_loss line per step, a val_loss line after each validation (which
    runs after every ``val_every``-th step). ``tick``: times rounded up to the tick that reads them."""
    out, t = [], t0
    for s in range(1, steps + 1):
        t += sec_per_step
        out.append((t, s, "train_loss"))
        if s % val_every == 0:
            t += val_seconds
            out.append((t, s, "val_loss"))
    if tick:
        out = [(t0 + -(-(t - t0) // tick) * tick, s, n) for t, s, n in out]
    return out


def test_eta_is_exact_on_a_known_timeline():
    # 45 s a step, a 20-minute validation every 25 steps, 311 steps; at step 43 (just after a step)
    samples = timeline(43, 45.0, 25, 1200.0)
    now = samples[-1][0]
    p = estimate(samples, now, total_steps=311, started_at=1000.0, usd_per_hour=3.6)
    assert (p.step, p.total_steps, p.val_every) == (43, 311, 25)
    assert p.sec_per_step == pytest.approx(45.0) and p.val_seconds == pytest.approx(1200.0)
    # 268 steps × 45 s + validations at 50, 75, ..., 300 (11) × 1200 s
    assert p.eta_end_s == pytest.approx(268 * 45 + 11 * 1200, abs=1.0)
    assert p.elapsed_s == pytest.approx(43 * 45 + 1200) and p.cost_usd == pytest.approx(p.elapsed_s / 1000)
    assert p.cost_to_finish_usd == pytest.approx(p.eta_end_s / 1000)


def test_eta_to_the_success_step_and_after_a_validation():
    samples = timeline(100, 10.0, 25, 200.0)  # the last sample is step 100's validation
    p = estimate(samples, samples[-1][0], total_steps=311, target_step=270)
    assert p.eta_s == pytest.approx(170 * 10 + 6 * 200, abs=1.0)  # validations at 125..250 (6) before 270
    assert p.eta_end_s == pytest.approx(211 * 10 + 8 * 200, abs=1.0)


def test_eta_from_tick_times_is_close():
    """orchd sees lines when a tick reads them (every 5 s here): the estimate stays within 2 %."""
    samples = timeline(120, 3.0, 30, 40.0, tick=5.0)
    p = estimate(samples, samples[-1][0], total_steps=300)
    true = 180 * 3.0 + 6 * 40.0
    assert p.eta_end_s == pytest.approx(true, rel=0.02)


def test_unknowns_are_none_never_guesses():
    p = estimate([], 0.0)
    assert p.step is None and p.eta_s is None and p.cost_usd is None
    one = estimate([(10.0, 5, "train_loss")], 20.0, total_steps=100)
    assert one.step == 5 and one.sec_per_step is None and one.eta_end_s is None
    past = estimate(timeline(50, 1.0, 10, 2.0), 100.0, total_steps=40)  # the log outran the total
    assert past.total_steps is None and past.eta_end_s is None


@pytest.mark.slow
def test_the_burgers_log_gives_step_and_total(tmp_path):
    """A real run of the repository's workload, parsed as the tick does: ``step N/T`` gives the
    step and the total, and the cadence of its evaluations is found."""
    out = subprocess.run([sys.executable, "-m", "workloads.burgers", "--epochs", "1", "--ckpt-dir", str(tmp_path)],
                         capture_output=True, cwd=Path(__file__).resolve().parents[1], timeout=300, check=True).stdout
    parser = LogParser(["val_loss", "train_loss"])
    events, _ = parser.feed(out, 0, final=True)
    samples = [(float(e.offset), e.step, e.name) for e in events if getattr(e, "step", None) is not None]
    p = estimate(samples, samples[-1][0], total_steps=parser.state.total)
    assert (p.step, p.total_steps, p.val_every) == (45, 45, 15) and p.eta_end_s == 0.0


def test_tqdm_counts_within_an_epoch_are_not_the_run_total():
    parser = LogParser(["train_loss"])
    parser.feed(b"Epoch 3:  50%|#####     | 1/2 [00:00<00:00, 4.3it/s, train_loss=0.3]\n", 0, final=True)
    assert parser.state.total is None
    parser.feed(b" 43%|####3     | 43/100 [00:10<00:13, 4.3it/s, loss=0.3]\n", 0, final=True)
    assert (parser.state.step, parser.state.total) == (43, 100)


@pytest.mark.slow
def test_a_real_run_shows_a_shrinking_eta_in_status_and_show(app, orchd, tmp_path):
    """Real training on the local backend: ``status --json`` carries progress (step of the total,
    seconds a step, validation cadence) and its ETA shrinks as the run goes; ``show`` prints it."""
    import json

    from orchestrator import service
    from tests.conftest import write_spec

    spec = write_spec(tmp_path, "name: eta\ncommand: python -m workloads.burgers --epochs 3 --step-delay 0.08 "
                                f"--ckpt-dir {tmp_path}/ckpt\nworkdir: {Path(__file__).resolve().parents[1]}\n"
                                "success: val_loss < 0.6 by step 135\n")
    (job,) = service.submit(app, spec)
    seen, forecasts = [], []
    deadline = time.time() + 120
    while time.time() < deadline:
        app.ticker.tick(lock_timeout=5)
        (row,) = json.loads(orchd("status", "--json").stdout)
        if row["state"] != "RUNNING":
            break
        p = row["progress"]
        if row["forecast"]:
            forecasts.append(row["forecast"])
        if p and p["eta_end_s"] is not None:
            seen.append(p)
            if len(seen) == 3:
                assert "progress: step " in orchd("show", str(job)).stdout
        time.sleep(1.0)
    assert len(seen) >= 3, seen
    assert all(p["total_steps"] == 135 and p["val_every"] == 15 for p in seen)
    assert seen[-1]["eta_end_s"] < seen[0]["eta_end_s"] and seen[0]["sec_per_step"] > 0.05
    assert forecasts and forecasts[-1]["at_step"] == 135 and forecasts[-1]["verdict"] in ("on track", "at risk")
