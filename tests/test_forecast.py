"""The learning-curve forecast (orchestrator/forecast.py) on synthetic curves with a known end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from orchestrator.conditions import parse_condition
from orchestrator.forecast import forecast
from orchestrator.logparse import LogParser


def curve(a: float, b: float, c: float, steps: range, noise: float = 0.0, seed: int = 0) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(s, a + b * s ** -c + rng.gauss(0, noise)) for s in steps]


def test_a_clean_power_law_is_extrapolated_exactly():
    points = curve(0.30, 2.0, 0.7, range(15, 121, 15))
    true = 0.30 + 2.0 * 270 ** -0.7
    f = forecast(points, parse_condition("val_loss < 0.40 by step 270"))
    assert f is not None and f.value == pytest.approx(true, rel=0.01) and f.low - 1e-6 <= true <= f.high + 1e-6
    assert f.verdict == "on track" and f.at_step == 270 and f.samples == 8
    assert forecast(points, parse_condition("val_loss < 0.30 by step 270")).verdict == "will miss"


def test_noise_widens_the_band_and_the_truth_stays_inside():
    true = 0.30 + 2.0 * 270 ** -0.7
    covered = 0
    for seed in range(20):
        f = forecast(curve(0.30, 2.0, 0.7, range(15, 121, 15), noise=0.01, seed=seed),
                     parse_condition("val_loss < 0.34 by step 270"))
        assert f is not None and f.high - f.low > 0.01
        covered += f.low <= true <= f.high
    assert covered >= 16  # an 80 % band (widened by the residuals) holds the truth in most runs


def test_a_borderline_target_is_at_risk():
    points = curve(0.30, 2.0, 0.7, range(15, 121, 15), noise=0.01, seed=3)
    true = 0.30 + 2.0 * 270 ** -0.7
    assert forecast(points, parse_condition(f"val_loss < {true:.4f} by step 270")).verdict == "at risk"


def test_no_forecast_without_enough_to_go_on():
    points = curve(0.30, 2.0, 0.7, range(15, 61, 15))  # 4 samples
    assert forecast(points, parse_condition("val_loss < 0.4 by step 270")) is None
    assert forecast(curve(0.3, 2, 0.7, range(15, 300, 15)), parse_condition("val_loss < 0.4 by step 270")) is None
    assert forecast(curve(0.3, 2, 0.7, range(15, 121, 15)), parse_condition("val_loss < 0.4")) is None
    assert forecast([(s, float("nan")) for s in range(1, 10)], parse_condition("val_loss < 0.4 by step 20")) is None


CURVES = Path(__file__).parent / "data" / "curves"


def real_curve(path: Path) -> list[tuple[int, float]]:
    events, _ = LogParser(["val_loss"]).feed(path.read_bytes(), 0, final=True)
    return [(e.step, e.value) for e in events if e.name == "val_loss" and e.step]


@pytest.mark.parametrize("path", sorted(CURVES.glob("*.log")), ids=lambda p: p.stem)
def test_on_real_curves_a_met_target_is_never_forecast_missed(path):
    """Real Burgers training curves (several learning rates, widths, depths, seeds): on one that
    met val_loss < 0.34 by its last step, no forecast at any point says "will miss" (so the
    ``forecast misses success`` cancel never fires on it); on one that missed, the verdict at
    40 % of the steps is not "on track"."""
    pts = real_curve(path)
    end = max(s for s, _ in pts)
    cond = parse_condition(f"val_loss < 0.34 by step {end}")
    met = min(v for _, v in pts) < 0.34
    verdicts = [f.verdict for i in range(5, len(pts)) if (f := forecast(pts[:i], cond)) is not None]
    assert verdicts
    if met:
        assert "will miss" not in verdicts
    else:
        at_40 = forecast([p for p in pts if p[0] <= 0.4 * end], cond)
        assert at_40 is not None and at_40.verdict != "on track"


def test_the_cancel_rule_fires_on_will_miss_only():
    from orchestrator import rules
    from orchestrator.forecast import Forecast
    from orchestrator.spec import JobSpec
    from orchestrator.states import JobState

    spec = JobSpec.model_validate({"name": "x", "command": "true", "success": "val_loss < 0.34 by step 270",
                                   "cancel_if": ["forecast misses success after 6 samples"]})
    miss = Forecast("val_loss", 270, 0.6, 0.5, 0.7, "will miss", 6)
    view = rules.JobView(spec=spec, attempt=1, state=JobState.RUNNING, forecast=miss)
    (d,) = rules.evaluate(view, [], 0.0)
    assert d.kind == "cancel" and d.reason.value == "EARLY_STOP" and "will miss" in d.detail
    for f in (Forecast("val_loss", 270, 0.3, 0.2, 0.4, "at risk", 9), Forecast("val_loss", 270, 0.6, 0.5, 0.7,
                                                                                "will miss", 5), None):
        assert rules.evaluate(rules.JobView(spec=spec, attempt=1, state=JobState.RUNNING, forecast=f), [], 0.0) == []
    with pytest.raises(ValueError, match="needs a success criterion with a step"):
        JobSpec.model_validate({"name": "x", "command": "true", "cancel_if": ["forecast misses success"]})


@pytest.mark.slow
def test_a_hopeless_run_is_stopped_early_with_the_forecast_in_its_reason(app, tmp_path):
    """Real training that cannot reach its target (a learning rate 150× too small): the tick's
    forecast says "will miss" and ``cancel_if: forecast misses success`` stops it long before its
    step 270, in the tick that first has samples enough."""
    from orchestrator import service
    from tests.conftest import wait_for, write_spec

    spec = write_spec(tmp_path, f"""name: hopeless
command: python -m workloads.burgers --epochs 6 --lr 2e-5 --step-delay 0.02 --ckpt-dir {tmp_path}/ckpt
workdir: {Path(__file__).resolve().parents[1]}
success: val_loss < 0.34 by step 270
cancel_if: [forecast misses success]
""")
    (job,) = service.submit(app, spec)
    def ended():
        app.ticker.tick(lock_timeout=5)
        (row,) = [r for r in service.job_summaries(app) if r["id"] == job]
        return service.job_detail(app, job) if row["state"] not in ("PENDING", "RUNNING") else None

    d = wait_for(ended, 180, interval=0.5, what="the hopeless run to be stopped")
    assert d["reason"] == "EARLY_STOP" and "forecast val_loss at step 270" in d["detail"], d
    assert "will miss" in d["detail"] and max(p["step"] for p in d["metrics"]["val_loss"]) < 270
