"""What ``orchd status`` lists, read with SQLAlchemy Core: one query per table, naming only the
columns shown, so a glance at the jobs costs no ORM, pydantic, backend or provider import
(``orchd status`` in ~0.2 s, as ``squeue`` users expect; bench/bench_cli.py).

The tables are named here as lightweight ``table()``/``column()`` clauses of the columns read;
their definitions (and migrations) stay in models.py. What depends on the stored spec (the
progress model's target step, the forecast) is computed only for jobs that are still active,
and imports what it needs then.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from sqlalchemy import Engine, column, func, select, table

from orchestrator.states import ACTIVE, JobState

JOBS = table("jobs", *(column(c) for c in (
    "id", "name", "backend", "state", "reason", "detail", "spec_json", "created_at", "started_at", "ended_at",
    "cost_usd", "sweep_id")))
ATTEMPTS = table("attempts", *(column(c) for c in (
    "job_id", "number", "state", "started_at", "usd_per_hour", "parser_state")))
SAMPLES = table("metrics", *(column(c) for c in ("id", "job_id", "attempt", "name", "step", "epoch", "value",
                                                         "at")))
HEARTBEATS = table("heartbeats", column("name"), column("at"))
ACTIVE_STATES = [s.value for s in ACTIVE]
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
    q = select(JOBS).order_by(JOBS.c.id.desc())
    q = q if where is None else q.where(where)
    with engine.connect() as conn:
        jobs = list(reversed(conn.execute(q.limit(limit) if limit else q).mappings().all()))
        ids = [j["id"] for j in jobs]
        attempts: dict[int, list[Any]] = {}
        latest: dict[int, dict[str, dict[str, Any]]] = {}
        if ids:
            for a in conn.execute(select(ATTEMPTS).where(ATTEMPTS.c.job_id.in_(ids))
                                  .order_by(ATTEMPTS.c.job_id, ATTEMPTS.c.number)).mappings():
                attempts.setdefault(a["job_id"], []).append(a)
            last = (select(func.max(SAMPLES.c.id)).where(SAMPLES.c.job_id.in_(ids))
                    .group_by(SAMPLES.c.job_id, SAMPLES.c.name))
            for m in conn.execute(select(SAMPLES.c.job_id, SAMPLES.c.name, SAMPLES.c.step, SAMPLES.c.value)
                                  .where(SAMPLES.c.id.in_(last))).mappings():
                latest.setdefault(m["job_id"], {})[m["name"]] = m
        out = []
        for j in jobs:
            metrics = latest.get(j["id"], {})
            steps = [m["step"] for m in metrics.values() if m["step"] is not None]
            atts = attempts.get(j["id"], [])
            active = not JobState(j["state"]).terminal
            out.append({"id": j["id"], "name": j["name"], "backend": j["backend"], "state": j["state"],
                        "reason": j["reason"], "detail": j["detail"], "attempts": len(atts),
                        "step": max(steps) if steps else None,
                        "metrics": {k: math.nan if v["value"] is None else v["value"] for k, v in metrics.items()},
                        "elapsed": None if j["started_at"] is None else (j["ended_at"] or now) - j["started_at"],
                        "cost_usd": j["cost_usd"], "sweep_id": j["sweep_id"],
                        "progress": progress(conn, j["id"], j["spec_json"], atts[-1] if atts else None, now)
                        if active else None,
                        "forecast": forecast_of(conn, j["id"], j["spec_json"]) if active else None})
        return out


def beat_age(engine: Engine, name: str = "watcher", now: float | None = None) -> float | None:
    """Seconds since ``name`` last ran (a daemon's or ``orchd poll``'s tick), or None if it never did."""
    with engine.connect() as conn:
        at = conn.execute(select(HEARTBEATS.c.at).where(HEARTBEATS.c.name == name)).scalar()
    return None if at is None else (time.time() if now is None else now) - at


def _spec(spec_json: str) -> Any:
    from orchestrator.spec import JobSpec

    return JobSpec.from_stored(spec_json)


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
    from orchestrator.conditions import parse_condition
    from orchestrator.eta import estimate

    if att is None or att["state"] != JobState.RUNNING.value:
        return None
    try:
        spec = _spec(spec_json)
        targets = [getattr(parse_condition(t), "by_step", None) for t in spec.success_conditions()]
    except ValueError:
        return None
    target = max((t for t in targets if t), default=None)
    rows = conn.execute(select(SAMPLES.c.at, SAMPLES.c.step, SAMPLES.c.name)
                        .where(SAMPLES.c.job_id == job_id, SAMPLES.c.attempt == att["number"],
                               SAMPLES.c.step.is_not(None)).order_by(SAMPLES.c.id)).all()
    try:
        parsed = json.loads(att["parser_state"] or "{}")
    except ValueError:
        parsed = {}
    total = (parsed.get("total") if isinstance(parsed, dict) else None) or spec.resources.total_steps
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
    from orchestrator.conditions import Threshold, parse_condition

    try:
        criteria = [c for c in map(parse_condition, _spec(spec_json).success_conditions())
                    if isinstance(c, Threshold) and c.by_step]
    except ValueError:
        return None
    if not criteria:
        return None
    from orchestrator.forecast import forecast

    c = criteria[0]
    rows = conn.execute(select(SAMPLES.c.step, SAMPLES.c.value)
                        .where(SAMPLES.c.job_id == job_id, SAMPLES.c.name == c.metric, SAMPLES.c.step.is_not(None))
                        .order_by(SAMPLES.c.id)).all()
    f = forecast([(st, v) for st, v in rows], c)
    return f.as_dict() if f else None
