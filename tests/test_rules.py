"""The rule engine as pure functions: (view, events, now) -> decisions."""

import math

from orchestrator.logparse import KeysReport, MetricSample, PatternHit
from orchestrator.rules import AttemptEnd, JobView, evaluate, on_attempt_end
from orchestrator.spec import JobSpec
from orchestrator.states import JobState, Reason


def spec(**kw) -> JobSpec:
    return JobSpec.model_validate({"name": "t", "command": "x", "metrics": ["val_loss", "train_loss"], **kw})


def view(s: JobSpec, **kw) -> JobView:
    return JobView(spec=s, attempt=kw.pop("attempt", 1), state=JobState.RUNNING, **kw)


def m(name, value, step=None):
    return MetricSample(name, value, step, None, 0)


KEYS = ["climax.blocks.0.attn.elevation_alpha", "climax.blocks.0.attn.H_scale"]


def test_missing_keys_exactly():
    s = spec(expect={"missing_keys": KEYS})
    assert evaluate(view(s), [KeysReport("missing", tuple(reversed(KEYS)), 2, 0)], 0) == []
    (d,) = evaluate(view(s), [KeysReport("missing", (*KEYS, "climax.head.weight"), 3, 0)], 0)
    assert d.kind == "cancel" and d.reason == Reason.BAD_CHECKPOINT
    assert "3 missing keys, expected exactly 2" in d.detail and "climax.head.weight" in d.detail


def test_missing_keys_at_most_and_cancel_if_count():
    s = spec(expect={"missing_keys": {"at_most": 2}})
    assert evaluate(view(s), [KeysReport("missing", (), 2, 0)], 0) == []
    assert evaluate(view(s), [KeysReport("missing", (), 3, 0)], 0)[0].reason == Reason.BAD_CHECKPOINT
    s = spec(cancel_if=["unexpected_keys >= 1"])
    assert evaluate(view(s), [KeysReport("unexpected", ("a",), 1, 0)], 0)[0].kind == "cancel"


def test_metric_expectation_checked_once_at_step():
    s = spec(expect={"val_loss": {"at_step": 25, "approx": 0.36, "tolerance": 0.05}})
    assert evaluate(view(s), [m("val_loss", 9.0, 10)], 0) == []  # before the step: not judged
    (d,) = evaluate(view(s), [m("val_loss", 0.38, 30)], 0)
    assert d.kind == "checked" and d.condition == "val_loss"
    (d,) = evaluate(view(s), [m("val_loss", 0.5, 25)], 0)
    assert d.kind == "cancel" and d.reason == Reason.EXPECTATION and "expected 0.36 ± 0.05" in d.detail
    assert evaluate(view(s, checked=frozenset({"val_loss"})), [m("val_loss", 0.5, 40)], 0) == []


def test_success_by_step_met_or_missed():
    s = spec(success="val_loss < 0.34 by step 270")
    (d,) = evaluate(view(s), [m("val_loss", 0.4, 100), m("val_loss", 0.3, 200)], 0)
    assert d.kind == "success" and "val_loss=0.3 at step 200" in d.detail
    (d,) = evaluate(view(s, best={"val_loss": 0.36}), [m("val_loss", 0.35, 285)], 0)
    assert d.kind == "cancel" and d.reason == Reason.EXPECTATION and "best val_loss 0.36" in d.detail
    met = view(s, success_met=frozenset({"val_loss < 0.34 by step 270"}))
    assert evaluate(met, [m("val_loss", 0.9, 300)], 0) == []


def test_cancel_if_nan_and_divergence():
    s = spec(cancel_if=["val_loss is nan", "train_loss > 3x best"])
    assert evaluate(view(s), [m("val_loss", math.nan, 5)], 0)[0].reason == Reason.EARLY_STOP
    assert evaluate(view(s), [m("train_loss", 1.0), m("train_loss", 0.5), m("train_loss", 1.4)], 0) == []
    (d,) = evaluate(view(s), [m("train_loss", 1.0), m("train_loss", 0.5), m("train_loss", 1.6)], 0)
    assert d.kind == "cancel" and "train_loss=1.6" in d.detail


def test_no_progress():
    s = spec(cancel_if=["no_progress 20m"])
    assert evaluate(view(s, last_log_at=1000.0), [], 1000.0 + 1199) == []
    assert evaluate(view(s, last_log_at=1000.0), [], 1000.0 + 1201)[0].reason == Reason.EARLY_STOP


def test_log_trigger_retries_with_override():
    s = spec(retry={"max_attempts": 2, "on": [{"when": "log:NCCL error", "override": {"resources": {"nodes": 1}}}]})
    (d,) = evaluate(view(s), [PatternHit("log:NCCL error", "NCCL error: remote process exited", 0)], 0)
    assert d.kind == "retry" and d.override.resources == {"nodes": 1} and "attempt 2/2" in d.detail
    (d,) = evaluate(view(s, attempt=2), [PatternHit("log:NCCL error", "NCCL error", 0)], 0)
    assert d.kind == "finish" and d.reason == Reason.RETRIES_EXHAUSTED


def test_attempt_end_backoff_and_exhaustion():
    s = spec(retry={"max_attempts": 3, "backoff": "30s", "factor": 2, "on": ["NODE_FAIL", "exit:137"],
                    "overrides": {3: {"env": {"X": "1"}}}})
    d1 = on_attempt_end(view(s, attempt=1), AttemptEnd(JobState.FAILED, 137))
    d2 = on_attempt_end(view(s, attempt=2), AttemptEnd(JobState.NODE_FAIL, None))
    assert (d1.kind, d1.delay, d2.kind, d2.delay) == ("retry", 30, "retry", 60)
    assert d2.override.env == {"X": "1"}  # per-attempt override for attempt 3
    d3 = on_attempt_end(view(s, attempt=3), AttemptEnd(JobState.FAILED, 137))
    assert (d3.kind, d3.state, d3.reason) == ("finish", JobState.FAILED, Reason.RETRIES_EXHAUSTED)
    d = on_attempt_end(view(s), AttemptEnd(JobState.FAILED, 1))  # not a trigger
    assert (d.kind, d.reason) == ("finish", Reason.NONZERO_EXIT)
    d = on_attempt_end(view(s), AttemptEnd(JobState.TIMEOUT, 143))
    assert (d.state, d.reason) == (JobState.TIMEOUT, Reason.TIME_LIMIT)


def test_exit_zero_with_broken_promise_is_failed():
    s = spec(success="val_loss < 0.1", expect={"val_loss": {"at_step": 25, "approx": 0.3, "tolerance": 0.1}})
    d = on_attempt_end(view(s, checked=frozenset({"val_loss"})), AttemptEnd(JobState.COMPLETED, 0))
    assert (d.state, d.reason) == (JobState.FAILED, Reason.EXPECTATION) and "success not met" in d.detail
    d = on_attempt_end(view(s, success_met=frozenset({"val_loss < 0.1"})), AttemptEnd(JobState.COMPLETED, 0))
    assert d.state == JobState.FAILED and "expect.val_loss" in d.detail
    d = on_attempt_end(view(s, success_met=frozenset({"val_loss < 0.1"}), checked=frozenset({"val_loss"})),
                       AttemptEnd(JobState.COMPLETED, 0))
    assert (d.state, d.reason) == (JobState.COMPLETED, Reason.SUCCESS)


def test_shutdown_idle_cancels_after_the_log_stops_growing():
    s = spec(shutdown={"idle": "15m"})
    assert evaluate(view(s, last_log_at=1000.0), [], 1000.0 + 899) == []
    (d,) = evaluate(view(s, last_log_at=1000.0), [], 1000.0 + 901)
    assert (d.kind, d.state, d.reason) == ("cancel", JobState.CANCELLED, Reason.IDLE) and "901s" in d.detail
    assert evaluate(view(spec(), last_log_at=0.0), [], 1e9) == []  # no idle limit: never


def test_shutdown_on_end_false_is_refused_with_the_reason():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not supported"):
        spec(shutdown={"on_end": False, "idle": "1h"})
