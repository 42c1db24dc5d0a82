"""What ``orchd status`` lists, read with SQLAlchemy Core: one query per table, naming only the
columns shown, so a glance at the jobs costs no ORM, pydantic, backend or provider import
(``orchd status`` in ~0.2 s, as ``squeue`` users expect; bench/bench_cli.py).

The tables are named here as lightweight ``table()``/``column()`` clauses of the columns read;
their definitions (and migrations) stay in models.py. What depends on the stored spec (the
progress model's target step, the forecast) is computed only for jobs that are still active,
and imports what it needs then.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any

from sqlalchemy import Engine, case, column, func, select, table

from orchestrator.states import ACTIVE, JobState

JOBS = table("jobs", *(column(c) for c in (
    "id", "name", "project", "backend", "state", "reason", "detail", "spec_json", "created_at", "started_at",
    "ended_at", "cost_usd", "sweep_id")))
ATTEMPTS = table("attempts", *(column(c) for c in (
    "job_id", "number", "state", "started_at", "ended_at", "usd_per_hour", "gpus", "cost_usd", "gpu_hours",
    "parser_state")))
SAMPLES = table("metrics", *(column(c) for c in ("id", "job_id", "attempt", "name", "step", "epoch", "value",
                                                         "at")))
HEARTBEATS = table("heartbeats", column("name"), column("at"))
ACTIVE_STATES = [s.value for s in ACTIVE]
ACTIVE_SET = frozenset(ACTIVE_STATES)
DAY = 24 * 3600.0


def _listed(include_all: bool, now: float) -> Any:
    """The jobs ``status`` lists: active ones and those ended in the last day, or all (None)."""
    if include_all:
        return None
    return JOBS.c.state.in_(ACTIVE_STATES) | (JOBS.c.ended_at >= now - DAY)


def count_jobs(engine: Engine, include_all: bool = False, now: float | None = None) -> int:
    """How many jobs ``job_summaries`` would list without a limit."""
    where = _listed(include_all, time.time() if now is None else now)
    q = select(func.count()).select_from(JOBS)
    with engine.connect() as conn:
        return conn.execute(q if where is None else q.where(where)).scalar() or 0


def job_summaries(engine: Engine, include_all: bool = False, now: float | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """One dict per job (active ones and those ended in the last day, or all; the newest
    ``limit`` when given), ascending by id: id, name, backend, state, reason, detail, attempts
    (count), step, metrics (latest value per name; NaN for a logged nan), elapsed (seconds),
    cost_usd (USD), sweep_id, progress (``eta.Progress`` as a dict, for a RUNNING attempt) and
    forecast (``forecast.Forecast`` as a dict, for an active job with a ``by step`` criterion)."""
    now = time.time() if now is None else now
    where = _listed(include_all, now)
    listed = select(JOBS.c.id).order_by(JOBS.c.id.desc())
    listed = listed if where is None else listed.where(where)
    listed = listed.limit(limit) if limit else listed
    # the spec (kilobytes) only of active jobs, the only ones whose progress is computed
    spec = case((JOBS.c.state.in_(ACTIVE_STATES), JOBS.c.spec_json), else_=None).label("spec_json")
    columns = [JOBS.c[c] for c in ("id", "name", "backend", "state", "reason", "detail", "started_at", "ended_at",
                                   "cost_usd", "sweep_id")]
    with engine.connect() as conn:
        # the listed ids as a subquery, not bound parameters: 10,000 of them would be compiled one by one
        jobs = conn.execute(select(*columns, spec).where(JOBS.c.id.in_(listed)).order_by(JOBS.c.id)).all()
        attempts: dict[int, list[dict[str, Any]]] = {}
        latest: dict[int, dict[str, tuple[int | None, float | None]]] = {}
        if jobs:  # rows are read as tuples: a RowMapping lookup per cell is 4x slower at 10,000 jobs
            a = ATTEMPTS.c
            for job_id, number, state, started, rate, parser in conn.execute(
                    select(a.job_id, a.number, a.state, a.started_at, a.usd_per_hour, a.parser_state)
                    .where(a.job_id.in_(listed)).order_by(a.job_id, a.number)).all():
                attempts.setdefault(job_id, []).append({"number": number, "state": state, "started_at": started,
                                                        "usd_per_hour": rate, "parser_state": parser})
            m = SAMPLES.c
            last = select(func.max(m.id)).where(m.job_id.in_(listed)).group_by(m.job_id, m.name)
            for job_id, name, step, value in conn.execute(select(m.job_id, m.name, m.step, m.value)
                                                          .where(m.id.in_(last))).all():
                latest.setdefault(job_id, {})[name] = (step, value)
        out = []
        for job_id, name, backend, state, reason, detail, started, ended, cost, sweep_id, spec_json in jobs:
            metrics = latest.get(job_id, {})
            steps = [st for st, _ in metrics.values() if st is not None]
            atts = attempts.get(job_id, [])
            active = state in ACTIVE_SET
            out.append({"id": job_id, "name": name, "backend": backend, "state": state, "reason": reason,
                        "detail": detail, "attempts": len(atts), "step": max(steps) if steps else None,
                        "metrics": {k: math.nan if v is None else v for k, (_, v) in metrics.items()},
                        "elapsed": None if started is None else (ended or now) - started,
                        "cost_usd": cost, "sweep_id": sweep_id,
                        "progress": progress(conn, job_id, spec_json, atts[-1] if atts else None, now)
                        if active else None,
                        "forecast": forecast_of(conn, job_id, spec_json) if active else None})
        return out


def beat_age(engine: Engine, name: str = "watcher", now: float | None = None) -> float | None:
    """Seconds since ``name`` last ran (a daemon's or ``orchd poll``'s tick), or None if it never did."""
    with engine.connect() as conn:
        at = conn.execute(select(HEARTBEATS.c.at).where(HEARTBEATS.c.name == name)).scalar()
    return None if at is None else (time.time() if now is None else now) - at


@functools.lru_cache(maxsize=1024)
def _plan(spec_json: str) -> tuple[int | None, int | None, Any] | None:
    """What progress and forecasts need of a stored spec: (the highest ``by step`` of its success
    criteria, ``resources.total_steps``, the first success Threshold that names a step), or None
    when it cannot be read. Cached: a sweep's jobs and every refresh of ``status --watch`` parse
    the same JSON."""
    from orchestrator.conditions import Threshold, parse_condition
    from orchestrator.spec import JobSpec

    try:
        spec = JobSpec.from_stored(spec_json)
        conditions = [parse_condition(t) for t in spec.success_conditions()]
    except ValueError:
        return None
    by_step = [c for c in conditions if getattr(c, "by_step", None)]
    return (max((c.by_step for c in by_step), default=None), spec.resources.total_steps,
            next((c for c in by_step if isinstance(c, Threshold)), None))


def attempt_row(att: Any) -> dict[str, Any] | None:
    """The columns ``progress_model`` reads, from an ORM ``Attempt`` (None stays None)."""
    if att is None:
        return None
    return {"number": att.number, "state": att.state, "started_at": att.started_at,
            "usd_per_hour": att.usd_per_hour, "parser_state": att.parser_state}


def progress_model(conn: Any, job_id: int, spec_json: str, att: Any, now: float) -> tuple[Any, int | None] | None:
    """(``eta.Progress`` of the job's current attempt ``att``, the success criterion's step or
    None), or None when that attempt is not RUNNING or the stored spec cannot be read. ``conn``:
    a Connection (or Session); ``att``: a mapping of the attempt's row (number, state,
    started_at, usd_per_hour, parser_state), see ``attempt_row``."""
    from orchestrator.eta import estimate

    if att is None or att["state"] != JobState.RUNNING.value:
        return None
    plan = _plan(spec_json)
    if plan is None:
        return None
    target, total_steps, _ = plan
    rows = conn.execute(select(SAMPLES.c.at, SAMPLES.c.step, SAMPLES.c.name)
                        .where(SAMPLES.c.job_id == job_id, SAMPLES.c.attempt == att["number"],
                               SAMPLES.c.step.is_not(None)).order_by(SAMPLES.c.id)).all()
    try:
        parsed = json.loads(att["parser_state"] or "{}")
    except ValueError:
        parsed = {}
    total = (parsed.get("total") if isinstance(parsed, dict) else None) or total_steps
    return estimate([tuple(r) for r in rows], now, total_steps=total, target_step=target,
                    started_at=att["started_at"], usd_per_hour=att["usd_per_hour"]), target


def progress(conn: Any, job_id: int, spec_json: str, att: Any, now: float) -> dict[str, Any] | None:
    """``progress_model``'s Progress as a dict (step, total_steps, sec_per_step, val_seconds,
    val_every, eta_s, eta_end_s, elapsed_s, cost_usd, cost_to_finish_usd), or None."""
    got = progress_model(conn, job_id, spec_json, att, now)
    return got[0].as_dict() if got else None


def forecast_of(conn: Any, job_id: int, spec_json: str) -> dict[str, Any] | None:
    """The forecast (``forecast.Forecast`` as a dict: metric, at_step, value, low, high, verdict,
    samples) of the job's first success criterion that names a step, when it has samples
    enough; else None. The caller decides whether the job is still active."""
    plan = _plan(spec_json)
    if plan is None or plan[2] is None:
        return None
    from orchestrator.forecast import forecast

    c = plan[2]
    rows = conn.execute(select(SAMPLES.c.step, SAMPLES.c.value)
                        .where(SAMPLES.c.job_id == job_id, SAMPLES.c.name == c.metric, SAMPLES.c.step.is_not(None))
                        .order_by(SAMPLES.c.id)).all()
    f = forecast([(st, v) for st, v in rows], c)
    return f.as_dict() if f else None
