"""The rule engine: pure functions from (what is known of a job, new log events, now) to
decisions. No I/O, no clock: the tick gathers the view, calls these, and applies the result.

``evaluate`` runs while an attempt is alive (expectations, success criteria, cancel_if, log
retry triggers, no_progress, shutdown.idle); ``on_attempt_end`` decides what an ended attempt means for the
job (COMPLETED, FAILED with a reason, or a retry after a backoff).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

from orchestrator.conditions import ForecastMisses, IsNaN, KeyCount, NoProgress, Threshold, parse_condition
from orchestrator.logparse import Event, KeysReport, MetricSample, PatternHit
from orchestrator.spec import JobSpec, KeysExpectation, Override
from orchestrator.states import JobState, Reason


@dataclass(frozen=True)
class JobView:
    """What the rules need to know about a job beyond the new events.

    ``best``: lowest finite value per metric so far in this attempt; ``checked``: metric
    expectations already evaluated; ``success_met``: success condition texts already met;
    ``last_log_at``: epoch seconds when the log last grew (or the attempt started).
    """

    spec: JobSpec
    attempt: int
    state: JobState
    last_log_at: float | None = None
    best: dict[str, float] = field(default_factory=dict)
    checked: frozenset[str] = frozenset()
    success_met: frozenset[str] = frozenset()
    forecast: Any = None  # forecast.Forecast of the success criterion, when a cancel_if asks for it


@dataclass(frozen=True)
class Decision:
    """``kind``: "cancel" (stop the attempt, job ends with ``state``/``reason``), "retry" (stop
    it and start another after ``delay`` seconds), "success" (a criterion was met, ``condition``),
    "checked" (an expectation passed, ``condition`` = metric), "finish" (the job ends)."""

    kind: str
    reason: Reason
    detail: str
    state: JobState = JobState.FAILED
    delay: float = 0.0
    override: Override | None = None
    condition: str = ""


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended, as the backend observed it."""

    state: JobState
    exit_code: int | None
    reason: str = ""


def _fmt_keys(keys: list[str] | tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(kind: str, want: KeysExpectation, report: KeysReport) -> str | None:
    """None if the report meets the expectation, else a sentence saying how it does not."""
    if want.at_most is not None:
        if report.count > want.at_most:
            return f"{report.count} {kind} keys, expected at most {want.at_most}: {_fmt_keys(report.keys)}"
        return None
    expected = set(want.exactly or [])
    got = set(report.keys)
    if report.count == len(expected) and (got == expected or not got):
        return None
    extra, absent = sorted(got - expected), sorted(expected - got)
    parts = [f"{report.count} {kind} keys, expected exactly {len(expected)}"]
    if extra:
        parts.append(f"not expected: {_fmt_keys(extra)}")
    if absent:
        parts.append(f"expected but not reported: {_fmt_keys(absent)}")
    return "; ".join(parts)


def _where(ev: MetricSample) -> str:
    return f"at step {ev.step}" if ev.step is not None else f"at epoch {ev.epoch}"


def evaluate(view: JobView, events: list[Event], now: float, best_into: dict[str, float] | None = None
             ) -> list[Decision]:
    """Decisions for a running attempt given its new events. The first "cancel" or "retry"
    wins (the tick stops there); "success"/"checked" decisions before it are kept.
    ``best_into``: a dict updated in place, instead of a copy of ``view.best``, with the lowest
    finite value per metric; complete (as ``remember_best`` would make it) when no decision is
    returned, which spares the tick's fast path a second pass over a chatty log's samples."""
    spec = view.spec
    out: list[Decision] = []
    plan = _plan_of(spec)
    conditions, cancel_on, triggers, watched = plan.conditions, plan.cancel_on, plan.triggers, plan.watched
    best = dict(view.best) if best_into is None else best_into
    checked = set(view.checked)
    success_on = {m: [(t, c) for t, c in conds if t not in view.success_met]  # a copy: a criterion met is removed
                  for m, conds in plan.success_on.items()}

    def stop(d: Decision) -> list[Decision]:
        return [*out, d]

    expect_metrics, isfinite = spec.expect.metrics, math.isfinite
    for ev in events:
        if type(ev) is MetricSample:  # the common case first: a chatty log has 10^5 a tick
            name, v = ev[0], ev[1]  # (indexing a tuple is cheaper than its named fields)
            finite = isfinite(v)
            if name not in watched:
                if finite and ((b := best.get(name)) is None or v < b):
                    best[name] = v
                continue
            step = ev[2]
            exp = expect_metrics.get(name)
            if exp and name not in checked and step is not None and step >= exp.at_step:
                checked.add(name)
                if not (finite and abs(v - exp.approx) <= exp.tolerance):
                    return stop(Decision("cancel", Reason.EXPECTATION,
                                         f"expect.{name}: {v:.6g} {_where(ev)}, expected {exp.approx} "
                                         f"± {exp.tolerance} at step {exp.at_step}"))
                out.append(Decision("checked", Reason.EXPECTATION, f"{name}={v:.6g} {_where(ev)} within "
                                    f"{exp.approx} ± {exp.tolerance}", condition=name))
            for text, cond in cancel_on.get(name, ()):
                kind = type(cond)  # (IsNaN, Threshold or Diverges: those with a metric, _Plan.of)
                if (not finite if kind is IsNaN else cond.holds(v, step) if kind is Threshold
                        else finite and name in best and v > cond.factor * best[name]):
                    return stop(Decision("cancel", Reason.EARLY_STOP,
                                         f"cancel_if '{text}': {name}={v:.6g} {_where(ev)}"))
            if succ := success_on.get(name):
                for text, cond in succ:  # (one met leaves in a new list: this one is not changed under the loop)
                    if finite and cond.holds(v, step):
                        success_on[name] = [tc for tc in success_on[name] if tc[0] != text]
                        out.append(Decision("success", Reason.SUCCESS, f"'{text}' met: {name}={v:.6g} {_where(ev)}",
                                            condition=text))
                    elif cond.by_step is not None and step is not None and step > cond.by_step:
                        b = best.get(name)
                        return stop(Decision("cancel", Reason.EXPECTATION,
                                             f"success '{text}' missed: step {step} reached"
                                             + (f", best {name} {b:.6g}" if b is not None else "")))
            if finite and ((b := best.get(name)) is None or v < b):
                best[name] = v
        elif isinstance(ev, KeysReport):
            want = spec.expect.missing_keys if ev.kind == "missing" else spec.expect.unexpected_keys
            if want is not None and (problem := check_keys(ev.kind, want, ev)):
                return stop(Decision("cancel", Reason.BAD_CHECKPOINT, f"expect.{ev.kind}_keys: {problem}"))
            for text, cond in conditions:
                if isinstance(cond, KeyCount) and cond.kind == ev.kind and cond.holds(ev.count):
                    return stop(Decision("cancel", Reason.BAD_CHECKPOINT,
                                         f"cancel_if '{text}': {ev.count} {ev.kind} keys: {_fmt_keys(ev.keys)}"))
        elif isinstance(ev, PatternHit):
            if (trigger := triggers.get(ev.name)) is not None:
                return stop(_retry_or_fail(view, f"{ev.name} in log: {ev.line.strip()[:200]}", trigger.override))
    for text, cond in conditions:
        f = view.forecast
        if isinstance(cond, ForecastMisses) and f is not None and f.verdict == "will miss" \
                and f.samples >= cond.min_samples:
            return stop(Decision("cancel", Reason.EARLY_STOP, f"cancel_if '{text}': forecast {f.describe()}"))
        if isinstance(cond, NoProgress) and view.state == JobState.RUNNING and view.last_log_at is not None \
                and now - view.last_log_at > cond.seconds:
            return stop(Decision("cancel", Reason.EARLY_STOP,
                                 f"cancel_if '{text}': no log output for {now - view.last_log_at:.0f}s"))
    idle = spec.shutdown.idle
    if idle is not None and view.state == JobState.RUNNING and view.last_log_at is not None \
            and now - view.last_log_at > idle:
        return stop(Decision("cancel", Reason.IDLE, f"shutdown.idle: no log output for "
                             f"{now - view.last_log_at:.0f}s (limit {idle:.0f}s)", state=JobState.CANCELLED))
    return out


def remember_best(state: dict[str, Any], events: list[Event]) -> None:
    """Keep the lowest finite value of each metric among ``events`` in ``state["best"]`` (an
    attempt's rule state, parsed: what ``JobView.best`` is read from)."""
    best = state.setdefault("best", {})
    isfinite = math.isfinite
    for ev in events:
        if type(ev) is MetricSample:
            name, v = ev[0], ev[1]
            if isfinite(v):
                b = best.get(name)
                if b is None or v < b:
                    best[name] = v


@dataclass(frozen=True)
class _Plan:
    """What ``evaluate`` derives from a spec alone, once per spec object: its parsed
    ``cancel_if`` (all, and per metric so each of a chatty log's samples meets only the
    conditions on its metric), its success thresholds per metric, its log retry triggers, and the
    metrics some rule reads (the others only update ``best``)."""

    conditions: list[tuple[str, Any]]
    cancel_on: dict[str, list[tuple[str, Any]]]
    success_on: dict[str, list[tuple[str, Any]]]
    triggers: dict[str, Any]
    watched: frozenset[str]
    forecast: bool  # a cancel_if asks for the forecast of the success criterion

    @classmethod
    def of(cls, spec: JobSpec) -> _Plan:
        conditions = [(t, parse_condition(t)) for t in spec.cancel_if]
        cancel_on: dict[str, list[tuple[str, Any]]] = {}
        for text, cond in conditions:
            if (metric := getattr(cond, "metric", None)) is not None:
                cancel_on.setdefault(metric, []).append((text, cond))
        success_on: dict[str, list[tuple[str, Any]]] = {}
        for text in spec.success_conditions():
            if isinstance(cond := parse_condition(text), Threshold):
                success_on.setdefault(cond.metric, []).append((text, cond))
        return cls(conditions, cancel_on, success_on, {t.when: t for t in spec.retry.on if t.when.startswith("log:")},
                   frozenset({*spec.expect.metrics, *cancel_on, *success_on}),
                   any(isinstance(c, ForecastMisses) for _, c in conditions))


_plans: dict[int, _Plan] = {}  # id(spec) -> plan; an entry leaves with its spec (weakref.finalize)


def _plan_of(spec: JobSpec) -> _Plan:
    plan = _plans.get(id(spec))
    if plan is None:
        plan = _plans[id(spec)] = _Plan.of(spec)
        weakref.finalize(spec, _plans.pop, id(spec), None)
    return plan


def asks_forecast(spec: JobSpec) -> bool:
    """Whether a ``cancel_if`` of ``spec`` reads the forecast (``forecast misses success``)."""
    return _plan_of(spec).forecast


def _retry_or_fail(view: JobView, why: str, override: Override | None, end_state: JobState = JobState.FAILED,
                   final_reason: Reason = Reason.NONZERO_EXIT) -> Decision:
    retry = view.spec.retry
    if view.attempt < retry.max_attempts:
        next_override = override or retry.overrides.get(view.attempt + 1)
        return Decision("retry", Reason.RETRY, f"{why}; attempt {view.attempt + 1}/{retry.max_attempts}",
                        delay=retry.delay(view.attempt), override=next_override)
    if retry.max_attempts > 1:
        return Decision("finish", Reason.RETRIES_EXHAUSTED,
                        f"{why}; {retry.max_attempts} attempts used", state=end_state)
    return Decision("finish", final_reason, why, state=end_state)


def on_attempt_end(view: JobView, end: AttemptEnd) -> Decision:
    """What an ended attempt means: "finish" (COMPLETED or a failure state) or "retry"."""
    spec = view.spec
    if end.state == JobState.COMPLETED and end.exit_code in (0, None):
        unmet = [t for t in spec.success_conditions() if t not in view.success_met]
        if unmet:
            return Decision("finish", Reason.EXPECTATION, f"exit 0 but success not met: {'; '.join(unmet)}")
        unchecked = sorted(set(spec.expect.metrics) - view.checked)
        if unchecked:
            return Decision("finish", Reason.EXPECTATION, "exit 0 but expectation never checked (step not "
                            f"reached or metric not logged): {', '.join(f'expect.{m}' for m in unchecked)}")
        return Decision("finish", Reason.SUCCESS, "exit 0" + (", success criteria met" if spec.success else ""),
                        state=JobState.COMPLETED)
    why = f"{end.state.value}" + (f" exit {end.exit_code}" if end.exit_code is not None else "") \
        + (f" ({end.reason})" if end.reason else "")
    final_reason = Reason.TIME_LIMIT if end.state == JobState.TIMEOUT else Reason.NONZERO_EXIT
    for trigger in spec.retry.on:
        w = trigger.when
        if w == end.state.value or (w.startswith("exit:") and end.exit_code == int(w[5:])):
            return _retry_or_fail(view, f"{why} matches retry.on '{w}'", trigger.override, end.state, final_reason)
    return Decision("finish", final_reason, why, state=end.state)
