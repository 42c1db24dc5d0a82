"""What a tick reads of an attempt's log and how its samples reach the database.

The bounds below keep one attempt's log from stalling a tick (the rest is read next tick, from
the stored offset); both the tick's ORM pass and its fast path (``orchestrator/quiet.py``) read
them here, at call time, so a test can lower them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from orchestrator.backends.base import Backend, LogRewritten, LogShrunk
from orchestrator.db import insert_many
from orchestrator.logparse import Event, LogParser, MetricSample, ParserState, tail_mark
from orchestrator.models import MetricSample as MetricRow
from orchestrator.spec import JobSpec

READ_CHUNK = 2 << 20           # bytes read from a log at a time (more than logparse.MAX_LINE)
MAX_READ_PER_TICK = 64 << 20   # per attempt, so one huge log cannot stall the tick
MAX_SAMPLES_PER_TICK = 100_000  # per attempt (under a second's work): the rest is read next tick

SAMPLE_COLUMNS = ("job_id", "attempt", "name", "step", "epoch", "value", "offset", "at")


def parser_for(spec: JobSpec, state: ParserState) -> LogParser:
    """The parser of ``spec``'s metrics, monitors and ``retry.on: log:...`` triggers, resumed at ``state``."""
    watch = [(t.when, t.when[4:]) for t in spec.retry.on if t.when.startswith("log:")]
    return LogParser(spec.metrics, [(m.name, m.regex) for m in spec.monitors], watch, state)


def read_new(backend: Backend, backend_id: str, offset: int, state: ParserState) -> tuple[bytes, int]:
    """(data, skip): up to READ_CHUNK bytes of the attempt's log from ``offset`` in ``data[skip:]``,
    after the ``skip`` bytes just before ``offset``, read with them and checked to be still those
    the parser consumed (``state.tail``; LogParser.feed takes both, so no chunk is copied to drop
    them): a log truncated and written again past the offset between two reads would otherwise be
    read on from the middle of its new text, its start never seen. Raises LogRewritten then (the
    caller reads it again from its start, as after LogShrunk), and what ``backend.read_log`` raises."""
    n, mark = state.tail if state.tail and offset else (0, None)
    n = min(n, offset)
    data = backend.read_log(backend_id, offset - n, READ_CHUNK + n)
    if n:
        if len(data) < n:
            raise LogShrunk(offset - n + len(data))
        if tail_mark(data[:n]) != (n, mark):
            raise LogRewritten(offset)
    return data, n


def sample_rows(job_id: int, attempt: int, events: Iterable[Event], now: float) -> Iterable[tuple[Any, ...]]:
    """The metric samples among ``events`` as rows in SAMPLE_COLUMNS order (NaN as None: SQLite has none)."""
    return ((job_id, attempt, name, step, epoch, value if value == value else None, offset, now)
            for name, value, step, epoch, offset in (ev for ev in events if type(ev) is MetricSample))


def insert_samples(s: Session, rows: list[tuple[Any, ...]]) -> None:
    """Insert metric samples (tuples in SAMPLE_COLUMNS order) in bulk (db.insert_many)."""
    insert_many(s, MetricRow.__tablename__, SAMPLE_COLUMNS, rows)
