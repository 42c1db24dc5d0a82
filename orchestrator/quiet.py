"""The tick's fast path: running attempts with nothing to decide.

At 10,000 running jobs, most attempts on most ticks have no news but log lines: the backend
says RUNNING (or nothing), the log grew by a few metric lines, and no rule acts on them. For
those, the ORM's load (a Job and its Attempts per job) and its flush were a third of the tick.
Here every active job is read with one Core SELECT of the columns a tick needs (with its current
attempt), and the quiet ones are written with one ``executemany`` UPDATE beside one INSERT of
their samples, committed together before the ORM pass: offsets and samples stay in one
transaction, so a ``kill -9`` loses and duplicates nothing.

An attempt is *quiet* when its job and it are RUNNING, no cancel or error is pending on the
job, its backend reports every change in its poll (``Backend.reports_every_change``: local,
SLURM; not rented instances, whose liveness orchd keeps itself), the poll said RUNNING or
nothing, its price and start are recorded, no ``cancel_if`` asks for a forecast, its new log
holds metric samples only (no checkpoint report, no log trigger) and was read without trouble,
and ``rules.evaluate`` decides nothing. Anything else is left untouched and goes to the ORM
pass, which reads the same bytes again: the fast path writes only what the ORM pass would have.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator import logread, rules
from orchestrator.backends.base import Backend, Observation
from orchestrator.costs import attempt_usage
from orchestrator.db import state_json, update_many
from orchestrator.errors import BackendError
from orchestrator.logparse import Event, MetricSample, ParserState
from orchestrator.models import Attempt, Job
from orchestrator.spec import JobSpec, Override
from orchestrator.states import ACTIVE, JobState

_J, _A = Job.__table__.c, Attempt.__table__.c
_LATEST = Attempt.__table__.alias("latest")
RUNNING = JobState.RUNNING.value
ATTEMPT_COLUMNS = ("log_offset", "parser_state", "rule_state", "last_log_at", "cost_usd", "gpu_hours")  # what it writes

# every active job with its current (highest-numbered) attempt, if any: the columns the tick's
# poll, sweep limits and fast path read (labels where jobs and attempts share a name); in no
# order (see active_rows)
ACTIVE_ROWS = (
    select(_J.id.label("job_id"), _J.state.label("job_state"), _J.backend, _J.sweep_id, _J.spec_json,
           _J.cancel_requested_at, _J.error_count, _J.cost_usd.label("job_cost_usd"),
           _A.id.label("attempt_id"), _A.number, _A.state, _A.backend_id, _A.ended_at, _A.overrides_json,
           _A.log_offset, _A.parser_state, _A.last_log_at, _A.rule_state, _A.started_at, _A.usd_per_hour,
           _A.gpus, _A.gpu_hours, _A.cost_usd, _A.launch_lease_until, _A.submitting_at)
    .select_from(Job.__table__.outerjoin(Attempt.__table__, (_A.job_id == _J.id) & (
        _A.number == select(func.max(_LATEST.c.number)).where(_LATEST.c.job_id == _J.id).scalar_subquery())))
    .where(_J.state.in_([s.value for s in ACTIVE])))

ActiveRow = namedtuple("ActiveRow", [c.name for c in ACTIVE_ROWS.selected_columns])  # type: ignore[misc]


def active_rows(s: Session) -> list[Any]:
    """ACTIVE_ROWS as ``ActiveRow`` tuples in job id order. Plain named tuples: a tick reads ~45
    fields of each of 10,000 rows, and a SQLAlchemy Row's attribute costs ~0.3 us against a
    named tuple's ~0.01 (0.13 s a tick); sorted here, not by SQL: the rows come from the state
    index, and SQLite sorted the 10,000 wide rows (texts included) in a temporary B-tree in 25 ms
    where Python merges two ordered runs in 0.3."""
    rows = list(map(ActiveRow._make, s.execute(ACTIVE_ROWS)))
    rows.sort(key=itemgetter(0))  # (job_id)
    return rows


def live(row: Any) -> bool:
    """A row whose current attempt the backend has and that has not ended (cf. tick._live)."""
    return row.backend_id is not None and row.ended_at is None


class QuietPass:
    """The fast path of one Ticker. Between ticks it keeps, per attempt it ticked, the parser and
    the parsed rule state it wrote (``memo``): the next tick reuses them only if the database
    still holds exactly the texts it wrote (any other writer, the ORM pass included, changes
    them), which saves the JSON parse and parser set-up (~13 µs an attempt)."""

    def __init__(self, backend_for: Callable[[str], Backend]):
        self.backend_for = backend_for
        # attempt id -> (spec, parser state text, parser, rule state text, rule state, spec text, override text)
        self.memo: dict[int, list[Any]] = {}

    def run(self, s: Session, rows: Sequence[Any], observations: dict[str, Observation],
            now: float) -> tuple[dict[int, JobSpec], int, int]:
        """Tick the quiet attempts among ``rows`` (``active_rows``) and commit them. Returns (the
        jobs it ticked: job id -> effective spec, bytes read, samples recorded); every other job is
        the ORM pass's.
        A job whose tick here raises is left to the ORM pass (which records the trouble)."""
        updates: list[tuple[Any, ...]] = []
        job_costs: list[tuple[Any, ...]] = []
        samples: list[tuple[Any, ...]] = []
        done: dict[int, JobSpec] = {}
        read_total = 0
        memo, self.memo = self.memo, {}  # attempts not ticked here leave it
        backends: dict[str, Backend] = {}
        for r in rows:
            if r.job_state != RUNNING or r.state != RUNNING or not live(r) or r.cancel_requested_at is not None \
                    or r.error_count:
                continue
            ob = observations.get(r.backend_id)
            if ob is not None and (ob.state != JobState.RUNNING or ob.launch_failed or ob.orphaned
                                   or r.started_at is None and (ob.started_at or ob.usd_per_hour)):
                continue  # news, or a start to record
            try:
                backend = backends.get(r.backend) or backends.setdefault(r.backend, self.backend_for(r.backend))
                if not backend.reports_every_change:
                    continue
                got = self._tick_one(r, backend, ob, now, memo.get(r.attempt_id))
            except Exception:  # noqa: BLE001 - the ORM pass meets it again and records it on the job
                continue
            if got is None:
                continue
            spec, events, offset, read, parser_state, rule_state = got
            usd, gpu_hours = attempt_usage(r, now)
            updates.append((offset, parser_state, rule_state, now if read else r.last_log_at, usd, gpu_hours,
                            r.attempt_id))
            if usd != r.cost_usd:
                job_costs.append(((r.job_cost_usd or 0.0) - (r.cost_usd or 0.0) + usd, r.job_id))
            job_id, number = r.job_id, r.number  # (every event here is a MetricSample)
            samples += [(job_id, number, name, step, epoch, value if value == value else None, offset, now)
                        for name, value, step, epoch, offset in events]
            done[r.job_id] = spec
            read_total += read
        if updates:
            update_many(s, "attempts", ATTEMPT_COLUMNS, updates)
            if job_costs:
                update_many(s, "jobs", ("cost_usd",), job_costs)
            if samples:
                logread.insert_samples(s, samples)
        s.commit()
        return done, read_total, len(samples)

    def _tick_one(self, r: Any, backend: Backend, ob: Observation | None, now: float,
                  memo: list[Any] | None) -> tuple[JobSpec, list[Event], int, int, str, str] | None:
        """(effective spec, events, new offset, bytes read, parser state, rule state) of a quiet attempt's tick;
        None as soon as it proves not quiet."""
        if memo is not None and memo[5] == r.spec_json and memo[6] == r.overrides_json:
            spec = memo[0]  # (comparing the texts is cheaper than hashing them for the spec cache)
        else:
            spec = JobSpec.from_stored(r.spec_json)
            if r.overrides_json and r.overrides_json != "{}":
                spec = spec.with_override(Override.model_validate_json(r.overrides_json))
        if rules.asks_forecast(spec):
            return None
        if r.usd_per_hour is None and (backend.usd_per_hour(spec, r.backend_id) or (ob and ob.usd_per_hour)):
            return None  # a price to record
        if memo is not None and memo[0] is spec and memo[1] == r.parser_state:
            parser = memo[2]
        else:
            parser = logread.parser_for(spec, ParserState.from_dict(json.loads(r.parser_state or "{}")))
        events: list[Event] = []
        offset, read = r.log_offset, 0
        while read < logread.MAX_READ_PER_TICK and len(events) < logread.MAX_SAMPLES_PER_TICK:
            try:
                data, skip = logread.read_new(backend, r.backend_id, offset, parser.state)
            except BackendError:  # shrunk, unreadable, a dropped connection: the ORM pass's to record
                return None
            size = len(data) - skip
            if not size:
                break
            read += size
            new, consumed = parser.feed(data, offset, skip=skip)
            events += new
            offset += consumed
            if size < logread.READ_CHUNK or consumed == 0:
                break
        if not set(map(type, events)) <= {MetricSample}:  # (in C: a chatty log has 10^5 events a tick)
            return None  # a checkpoint report or a log trigger: rules and rows the ORM pass writes
        state = memo[4] if memo is not None and memo[3] == r.rule_state else json.loads(r.rule_state or "{}")
        best = state.get("best", {})
        view = rules.JobView(spec=spec, attempt=r.number, state=JobState.RUNNING,
                             last_log_at=now if read else r.last_log_at, best=best,
                             checked=frozenset(state.get("checked", [])),
                             success_met=frozenset(state.get("success_met", [])))
        if rules.evaluate(view, events, now, best_into=best):  # (a state with a decision is dropped)
            return None
        rule_state = r.rule_state
        if events:
            state["best"] = best
            rule_state = state_json(state)
        parser_state = r.parser_state if memo is not None and not read else state_json(parser.state.to_dict())
        entry = (spec, parser_state, parser, rule_state, state, r.spec_json, r.overrides_json)
        if memo is None:
            memo = list(entry)
        else:  # the same list each tick: a new one per attempt and tick made every full GC pass come twice as often
            memo[:] = entry
        self.memo[r.attempt_id] = memo
        return spec, events, offset, read, parser_state, rule_state
