"""What ``orchd status`` lists, read with a few plain SELECTs through the database's DB-API
connection: only the columns shown, one query per table (not per job), and neither SQLAlchemy,
the ORM, the backends nor a provider SDK imported on SQLite (``orchd status`` ~0.2 s, near
``squeue``; bench/bench_cli.py). On PostgreSQL the same SQL runs on a connection from
SQLAlchemy's pool.

The SQL is the portable subset SQLite and PostgreSQL share, with ``?`` markers (turned into
``%s`` for psycopg). Table and column names follow models.py (a test holds them to it). What
depends on the stored spec (the progress model's target step, the forecast) is computed only
for jobs that are still active, and imports what it needs then.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Iterator
from typing import Any

from orchestrator.states import ACTIVE, JobState

ACTIVE_STATES = tuple(s.value for s in ACTIVE)
ACTIVE_SET = frozenset(ACTIVE_STATES)
DAY = 24 * 3600.0
# the tables and columns read here (tests/test_db.py checks them against models.py)
COLUMNS = {
    "jobs": ("id", "name", "backend", "state", "reason", "detail", "spec_json", "started_at", "ended_at",
             "cost_usd", "sweep_id"),
    "attempts": ("job_id", "number", "state", "started_at", "usd_per_hour", "parser_state"),
    "metrics": ("id", "job_id", "attempt", "name", "step", "value", "at"),
    "heartbeats": ("name", "at"),
}


class Reader:
    """A DB-API connection (sqlite3, psycopg, or SQLAlchemy's pooled proxy of one) and its
    parameter marker: ``rows(sql, params)`` runs SQL written with ``?`` markers."""

    def __init__(self, dbapi_conn: Any, mark: str = "?"):
        self.conn = dbapi_conn
        self.mark = mark

    def rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql if self.mark == "?" else sql.replace("?", self.mark), tuple(params))
            return cur.fetchall()
        finally:
            cur.close()

    def value(self, sql: str, params: tuple | list = ()) -> Any:
        got = self.rows(sql, params)
        return got[0][0] if got else None


def session_reader(s: Any) -> Reader:
    """A Reader on an ORM Session's connection (inside its transaction)."""
    dialect = s.get_bind().dialect
    return Reader(s.connection().connection, "?" if dialect.paramstyle == "qmark" else "%s")


def _sqlite_file(url: str) -> str | None:
    """The file of a plain ``sqlite:///path`` URL (no query, not in memory), else None."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url[len("sqlite:///"):]
    return path if path and path != ":memory:" else None


@contextlib.contextmanager
def open_reader(app: Any) -> Iterator[Reader]:
    """A Reader on ``app``'s database. A SQLite file whose schema is at the head revision is
    opened with the standard library's sqlite3 alone; anything else (PostgreSQL, a new or older
    database, which SQLAlchemy creates or upgrades first) goes through ``app.engine``."""
    import os

    path = _sqlite_file(app.settings.db_url)
    if path is not None and os.path.exists(path):
        import sqlite3

        from orchestrator.revision import head_revision

        conn = sqlite3.connect(path, timeout=30)
        try:
            try:
                recorded = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.Error:
                recorded = None
            if recorded is not None and recorded[0] == head_revision():
                yield Reader(conn)
                return
        finally:
            conn.close()
    engine = app.engine
    raw = engine.raw_connection()
    try:
        yield Reader(raw, "?" if engine.dialect.paramstyle == "qmark" else "%s")
    finally:
        raw.close()


def _in(values: tuple | list) -> str:
    return ", ".join("?" * len(values))


def _listed(include_all: bool, now: float, limit: int | None) -> tuple[str, list[Any]]:
    """SQL selecting the ids ``status`` lists (active jobs and those ended in the last day, or
    all; the newest ``limit``), and its parameters."""
    sql, params = "SELECT id FROM jobs", []
    if not include_all:
        sql += f" WHERE state IN ({_in(ACTIVE_STATES)}) OR ended_at >= ?"
        params = [*ACTIVE_STATES, now - DAY]
    sql += " ORDER BY id DESC"
    if limit:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def count_jobs(r: Reader, include_all: bool = False, now: float | None = None) -> int:
    """How many jobs ``job_summaries`` would list without a limit."""
    sql, params = _listed(include_all, time.time() if now is None else now, None)
    return r.value(f"SELECT COUNT(*) FROM ({sql}) AS listed", params) or 0


def job_summaries(r: Reader, include_all: bool = False, now: float | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """One dict per job (active ones and those ended in the last day, or all; the newest
    ``limit`` when given), ascending by id: id, name, backend, state, reason, detail, attempts
    (count), step, metrics (latest value per name; NaN for a logged nan), elapsed (seconds),
    cost_usd (USD), sweep_id, progress (``eta.Progress`` as a dict, for a RUNNING attempt) and
    forecast (``forecast.Forecast`` as a dict, for an active job with a ``by step`` criterion)."""
    now = time.time() if now is None else now
    listed, params = _listed(include_all, now, limit)
    # the listed ids as a subquery, not thousands of parameters; the spec (kilobytes) only of
    # active jobs, the only ones whose progress is computed
    jobs = r.rows("SELECT id, name, backend, state, reason, detail, started_at, ended_at, cost_usd, sweep_id, "
                  f"CASE WHEN state IN ({_in(ACTIVE_STATES)}) THEN spec_json END "
                  f"FROM jobs WHERE id IN ({listed}) ORDER BY id", [*ACTIVE_STATES, *params])
    attempts: dict[int, list[dict[str, Any]]] = {}
    latest: dict[int, dict[str, tuple[int | None, float | None]]] = {}
    if jobs:
        for job_id, number, state, started, rate, parser in r.rows(
                "SELECT job_id, number, state, started_at, usd_per_hour, parser_state FROM attempts "
                f"WHERE job_id IN ({listed}) ORDER BY job_id, number", params):
            attempts.setdefault(job_id, []).append({"number": number, "state": state, "started_at": started,
                                                    "usd_per_hour": rate, "parser_state": parser})
        for job_id, name, step, value in r.rows(
                "SELECT job_id, name, step, value FROM metrics WHERE id IN (SELECT MAX(id) FROM metrics "
                f"WHERE job_id IN ({listed}) GROUP BY job_id, name)", params):
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
                    "progress": progress(r, job_id, spec_json, atts[-1] if atts else None, now) if active else None,
                    "forecast": forecast_of(r, job_id, spec_json) if active else None})
    return out


def beat_age(r: Reader, name: str = "watcher", now: float | None = None) -> float | None:
    """Seconds since ``name`` last ran (a daemon's or ``orchd poll``'s tick), or None if it never did."""
    at = r.value('SELECT "at" FROM heartbeats WHERE name = ?', (name,))
    return None if at is None else (time.time() if now is None else now) - at


@functools.lru_cache(maxsize=1024)
def _plan(spec_json: str) -> tuple[int | None, int | None, Any] | None:
    """What progress and forecasts need of a stored spec: (the highest ``by step`` of its success
    criteria, ``resources.total_steps``, the first success Threshold that names a step), or None
    when it cannot be read. Cached: a sweep's jobs and every refresh of ``status --watch`` parse
    the same JSON. Read from the JSON (``JobSpec.model_dump_json``, validated when it was
    stored) without building the JobSpec: pydantic and the spec's model take 0.12-0.16 s to
    import here, as long as the rest of ``orchd status`` while a job runs."""
    from orchestrator.conditions import Threshold, parse_condition

    try:
        spec = json.loads(spec_json)
        success = spec.get("success")
        texts = [success] if isinstance(success, str) else list(success or [])
        conditions = [parse_condition(t) for t in texts]
        total_steps = (spec.get("resources") or {}).get("total_steps")
    except (ValueError, TypeError, AttributeError):  # not JSON, not an object, not the shapes above
        return None
    if total_steps is not None and (type(total_steps) is not int or total_steps < 1):
        return None
    by_step = [c for c in conditions if getattr(c, "by_step", None)]
    return (max((c.by_step for c in by_step), default=None), total_steps,
            next((c for c in by_step if isinstance(c, Threshold)), None))


def attempt_row(att: Any) -> dict[str, Any] | None:
    """The columns ``progress_model`` reads, from an ORM ``Attempt`` (None stays None)."""
    if att is None:
        return None
    return {"number": att.number, "state": att.state, "started_at": att.started_at,
            "usd_per_hour": att.usd_per_hour, "parser_state": att.parser_state}


def progress_model(r: Reader, job_id: int, spec_json: str, att: Any, now: float) -> tuple[Any, int | None] | None:
    """(``eta.Progress`` of the job's current attempt ``att``, the success criterion's step or
    None), or None when that attempt is not RUNNING or the stored spec cannot be read. ``att``:
    a mapping of the attempt's row (number, state, started_at, usd_per_hour, parser_state), see
    ``attempt_row``."""
    from orchestrator.eta import estimate

    if att is None or att["state"] != JobState.RUNNING.value:
        return None
    plan = _plan(spec_json)
    if plan is None:
        return None
    target, total_steps, _ = plan
    rows = r.rows('SELECT "at", step, name FROM metrics WHERE job_id = ? AND attempt = ? AND step IS NOT NULL '
                  "ORDER BY id", (job_id, att["number"]))
    try:
        parsed = json.loads(att["parser_state"] or "{}")
    except ValueError:
        parsed = {}
    total = (parsed.get("total") if isinstance(parsed, dict) else None) or total_steps
    return estimate([tuple(row) for row in rows], now, total_steps=total, target_step=target,
                    started_at=att["started_at"], usd_per_hour=att["usd_per_hour"]), target


def progress(r: Reader, job_id: int, spec_json: str, att: Any, now: float) -> dict[str, Any] | None:
    """``progress_model``'s Progress as a dict (step, total_steps, sec_per_step, val_seconds,
    val_every, eta_s, eta_end_s, elapsed_s, cost_usd, cost_to_finish_usd), or None."""
    got = progress_model(r, job_id, spec_json, att, now)
    return got[0].as_dict() if got else None


def forecast_of(r: Reader, job_id: int, spec_json: str) -> dict[str, Any] | None:
    """The forecast (``forecast.Forecast`` as a dict: metric, at_step, value, low, high, verdict,
    samples) of the job's first success criterion that names a step, when it has samples
    enough; else None. The caller decides whether the job is still active."""
    plan = _plan(spec_json)
    if plan is None or plan[2] is None:
        return None
    from orchestrator.forecast import forecast

    c = plan[2]
    rows = r.rows("SELECT step, value FROM metrics WHERE job_id = ? AND name = ? AND step IS NOT NULL ORDER BY id",
                  (job_id, c.metric))
    f = forecast([(st, v) for st, v in rows], c)
    return f.as_dict() if f else None
