"""One tick: start what is due, poll every active attempt (one batched call per backend), read
each log from its stored offset, record what the parser found, apply the rules.

A job's new metric rows, its new log offset and any state change commit together or not at
all, so a crash (``kill -9``) mid-tick loses nothing and duplicates nothing: the next tick
re-reads from the stored offset. Running attempts with nothing to decide go first, on a fast
path with one commit for them all (orchestrator/quiet.py); the ORM pass then takes every other
job, committing after each job whose process it started or stopped, and once at the end for the
rest (one commit per job cost ~2 ms each). Ticks are serialised across processes by the tick
lock (dblock.py: a ``flock`` on SQLite, an advisory lock on PostgreSQL), so ``orchd poll`` from
cron and ``orchd daemon`` never act twice on the same news.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from orchestrator import digest, leases, logread, notify, quiet, rules
from orchestrator.backends.base import ArrayBackend, Backend, LogShrunk, LogUnreadable, Observation, SubmitRequest
from orchestrator.clusters import Config
from orchestrator.config import Settings
from orchestrator.costs import attempt_usage, budget_scopes, budgets_apply, crossed
from orchestrator.db import state_json
from orchestrator.dblock import db_lock
from orchestrator.errors import BackendError
from orchestrator.lifecycle import end_attempt, record_action, switch_state
from orchestrator.logparse import Event, KeysReport, MetricSample, ParserState
from orchestrator.models import Attempt, Job
from orchestrator.models import KeysReport as KeysRow
from orchestrator.models import MetricSample as MetricRow
from orchestrator.spec import JobSpec, turn_spec_cache
from orchestrator.states import JobState, Reason

log = logging.getLogger("orchd.tick")
MAX_JOB_ERRORS = 3  # ticks in a row that fail on one job before it is failed with reason ORCHD_ERROR
MAX_RELAUNCHES = 3  # launches of one job cut short by orchd's own stop that are launched again
INTERRUPTED = "launch failed: launch interrupted"  # how such an attempt's end reads



@dataclass
class TickReport:
    """What a tick did: counts, for logs and the benchmark."""

    jobs: int = 0
    started: int = 0
    bytes_read: int = 0
    events: int = 0
    decisions: list[str] = field(default_factory=list)
    side_effects: int = 0  # processes started or stopped
    seconds: float = 0.0
    metric_rows: list[tuple] = field(default_factory=list, repr=False)  # logread.SAMPLE_COLUMNS; in bulk at commits
    quiet: int = 0  # jobs ticked on the fast path (orchestrator/quiet.py)


def effective_spec(job: Job, attempt: Attempt) -> JobSpec:
    """The job's spec with the attempt's retry override applied."""
    return job.spec.with_override(attempt.override)


def _account(job: Job, now: float) -> None:
    """Bring the job's and its attempts' USD and GPU-hours up to ``now``."""
    for a in job.attempts:
        # every attempt, ended ones too: an end is often heard after it happened (a failed launch's
        # final destroy is confirmed later), with its final price (the blend of what it rented)
        if a.started_at is not None:
            usd, gpu_hours = attempt_usage(a, now)
            if (usd, gpu_hours) != (a.cost_usd, a.gpu_hours):  # an unchanged row stays out of the flush
                a.cost_usd, a.gpu_hours = usd, gpu_hours
    total = sum(a.cost_usd or 0 for a in job.attempts)
    if total != job.cost_usd:
        job.cost_usd = total


def _success_forecast(s: Session, job: Job, spec: JobSpec, events: list[Event]) -> Any:
    """The forecast of the spec's success criterion (forecast.Forecast), from the job's recorded
    samples and this tick's new ones; computed only when a ``cancel_if`` asks for it (a fit per
    tick is cheap, but not free)."""
    from orchestrator.conditions import Threshold, parse_condition
    from orchestrator.forecast import forecast

    if not rules.asks_forecast(spec):
        return None
    c = next(c for c in map(parse_condition, spec.success_conditions()) if isinstance(c, Threshold) and c.by_step)
    rows = s.execute(select(MetricRow.step, MetricRow.value).where(
        MetricRow.job_id == job.id, MetricRow.name == c.metric, MetricRow.step.is_not(None))).all()
    points = [(st, v) for st, v in rows] + [(e.step, e.value) for e in events
                                             if isinstance(e, MetricSample) and e.name == c.metric and e.step]
    return forecast(points, c)


def _live(att: Attempt | None) -> bool:
    """An attempt the backend has and that has not ended."""
    return att is not None and att.backend_id is not None and att.ended_at is None


def _interrupted_before(job: Job, number: int) -> int:
    """How many of ``job``'s attempts numbered below ``number`` were launches orchd itself cut short."""
    return sum(1 for a in job.attempts if a.number < number and a.reason and a.reason.startswith(INTERRUPTED))


def _token(att: Attempt | quiet.ActiveRow) -> str:
    """The attempt's idempotency token, from its committed intent: the same in every process."""
    return f"{att.job_id}.{att.number}.{round((att.submitting_at or 0) * 1e6):x}"


class Ticker:
    """Applies ticks to the database with the given backends (``backend_for(name)``)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], backend_for: Callable[[str], Backend],
                 config: Config | None = None):
        self.settings = settings
        self.sessions = sessions
        self.backend_for = backend_for
        self.config = config or Config()
        self._digest_done_on: str | None = None  # the date the digest needs nothing more (digest.enqueue_due)
        self.fast_path: quiet.QuietPass | None = quiet.QuietPass(backend_for)  # None: every job through the ORM

    def lock(self, name: str = "tick", timeout: float | None = 0.0) -> AbstractContextManager[None]:
        """Lock ``name`` of this database (see dblock): held by every tick, cancel and reconcile,
        so processes on any host sharing the database never act twice. Raises TickBusy."""
        return db_lock(self.sessions.kw["bind"], name, timeout, self.settings.home)

    # ------------------------------------------------------------------ entry point

    def tick(self, now: float | None = None, lock_timeout: float | None = 0.0) -> TickReport:
        """Run one tick. Raises TickBusy if another tick holds the lock past ``lock_timeout``."""
        t0 = time.perf_counter()
        report = TickReport()
        with self.lock("tick", lock_timeout):
            now = time.time() if now is None else now
            turn_spec_cache()  # the specs of jobs no longer active leave memory
            with self.sessions() as s:
                rows = quiet.active_rows(s)  # columns only: the ORM loads what the fast path leaves
                observations = self._poll([(r.backend_id, r.backend) for r in rows if quiet.live(r)],
                                          {r.backend_id: _token(r) for r in rows if (r.launch_lease_until or 0) > now})
                live = Counter(r.sweep_id for r in rows if r.sweep_id and quiet.live(r))
                done: dict[int, JobSpec] = {}
                if self.fast_path is not None:
                    done, read, samples = self.fast_path.run(s, rows, observations, now)
                    report.jobs, report.quiet, report.bytes_read, report.events = len(done), len(done), read, samples
                jobs = self._load([r.job_id for r in rows if r.job_id not in done], s)
                self._start_arrays(s, jobs, now, report)
                for job in jobs:
                    report.jobs += 1
                    if job.error_count:  # it failed last tick: what the jobs before it did must not go with it
                        self._commit(s, report)
                    acted = report.side_effects
                    try:
                        with s.no_autoflush:
                            self._advance(s, job, observations, now, report, live)
                        _account(job, now)
                        if job.error_count:  # (set only when it changes: a clean job stays out of the flush)
                            job.error_count = 0
                        if report.side_effects != acted:
                            self._commit(s, report)  # a process was started or stopped: record it at once
                    except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the others
                        s.rollback()  # what this tick recorded since the last commit is redone next tick
                        report.metric_rows.clear()
                        if isinstance(e, BackendError) and not isinstance(e, LogUnreadable):
                            log.warning("job %s: %s (no news this tick)", job.id, e)  # a provider or network
                            continue  # hiccup: tried again next tick; liveness rules end what stays silent
                        self._job_error(s, job, e, now, report)
                self._commit(s, report)  # metric rows and log offsets of quiet jobs: one commit
                try:
                    active_specs = (done.get(r.job_id) or r.spec_json for r in rows)  # (parsed ones where known)
                    if budgets_apply(self.config.budgets, active_specs):
                        self._budgets(s, now, report)
                        self._commit(s, report)
                except Exception:  # noqa: BLE001 - what the jobs did is committed; budgets are checked again next tick
                    s.rollback()
                    log.exception("checking budgets failed; the next tick checks again")
                try:
                    today = time.strftime("%Y-%m-%d", time.localtime(now))
                    if self._digest_done_on != today and digest.enqueue_due(s, self.config.email, now) is None:
                        self._digest_done_on = today  # no more digest queries on this process's ticks today
                    self._commit(s, report)
                except Exception:  # noqa: BLE001 - e.g. a job's report cannot be built: tried again next tick
                    s.rollback()
                    log.exception("building the daily digest failed; the next tick tries again")
        report.seconds = time.perf_counter() - t0
        return report

    @staticmethod
    def _load(ids: list[int], s: Session) -> list[Job]:
        """The jobs ``ids`` with their attempts, in id order (in pieces: a database caps a query's parameters)."""
        jobs: list[Job] = []
        for i in range(0, len(ids), 500):
            jobs += s.scalars(select(Job).where(Job.id.in_(ids[i:i + 500])).options(selectinload(Job.attempts))
                              .order_by(Job.id)).all()
        return jobs

    @staticmethod
    def _commit(s: Session, report: TickReport) -> None:
        if report.metric_rows:
            logread.insert_samples(s, report.metric_rows)
            report.metric_rows.clear()
        s.commit()

    def reconcile(self, lock_timeout: float | None = 0.0) -> dict[str, list[str]]:
        """For each cloud backend in use: destroy instances labelled by orchd that no live attempt
        owns, adopt the rest (they are simply polled). Run at every daemon start and ``orchd poll``,
        under the tick lock: a tick may be renting an instance it has not recorded yet. Raises
        TickBusy if the lock stays held past ``lock_timeout`` seconds."""
        done: dict[str, list[str]] = {}
        with self.lock("tick", lock_timeout):
            with self.sessions() as s:
                live = s.execute(select(Attempt.backend_id, Job.backend).join(Job).where(
                    Attempt.ended_at.is_(None), Attempt.backend_id.is_not(None))).all()
            for name in [n for n in ("vastai", "runpod") if getattr(self.config, n) is not None]:
                try:
                    done[name] = self.backend_for(name).reconcile({b for b, n in live if n == name})
                except Exception as e:  # noqa: BLE001 - a provider's trouble is logged; the next round tries again
                    log.warning("reconcile %s failed: %s: %s", name, type(e).__name__, e)
        return done

    def _poll(self, running: list, leased: dict[str, str]) -> dict[str, Observation]:
        """Poll the live attempts ``running`` ((backend id, backend name) pairs), one call per
        backend; ``leased``: the backend ids whose launch some orchd process vouches for (leases.py),
        each with its intent's token."""
        by_backend: dict[str, list[str]] = defaultdict(list)
        for backend_id, backend in running:
            by_backend[backend].append(backend_id)
        out: dict[str, Observation] = {}
        for name, ids in by_backend.items():
            try:
                out.update(self.backend_for(name).poll(ids, {i: leased[i] for i in ids if i in leased}))
            except Exception as e:  # noqa: BLE001 - a failed poll is no news, never a state change, never a crash
                log.warning("poll of %s failed (no news this tick): %s: %s", name, type(e).__name__, e)
        return out

    def _job_error(self, s: Session, job: Job, e: Exception, now: float, report: TickReport) -> None:
        """Record an exception raised while handling ``job`` on the job itself (an action; after
        MAX_JOB_ERRORS ticks in a row, FAILED with reason ORCHD_ERROR and its attempt stopped).
        The traceback goes to the log once, on the first failure."""
        what = f"{type(e).__name__}: {e}"[:500]
        try:
            job.error_count = (job.error_count or 0) + 1
            if job.error_count == 1:
                log.exception("job %s (%s): orchd failed on it this tick; it goes on with the others", job.id,
                              job.name)
            else:
                log.error("job %s (%s): orchd failed on it again (%d in a row): %s", job.id, job.name,
                          job.error_count, what)
            att = job.current_attempt
            record_action(s, job, "orchd_error", f"tick {job.error_count}/{MAX_JOB_ERRORS}: {what}", now, att)
            if job.error_count >= MAX_JOB_ERRORS:
                if att is not None and _live(att):
                    try:
                        ended = self.release_attempt(s, job, att, self.backend_for(job.backend), now, stop=True)
                    except Exception as stop_error:  # noqa: BLE001 - the job ends either way
                        log.error("job %s: could not stop attempt %s: %s", job.id, att.number, stop_error)
                        ended = now
                    end_attempt(s, att, JobState.FAILED, f"ORCHD_ERROR: {what}", ended)
                elif att is not None and att.backend_id is None and att.ended_at is None:
                    end_attempt(s, att, JobState.FAILED, f"ORCHD_ERROR: {what}", now)
                switch_state(s, job, JobState.FAILED, Reason.ORCHD_ERROR, what, now, att)
                try:
                    self._notify(s, job, "failed", f"FAILED: {Reason.ORCHD_ERROR.value}", now)
                except Exception as mail_error:  # noqa: BLE001 - e.g. its spec is what cannot be read
                    log.error("job %s: no failure mail: %s", job.id, mail_error)
                report.side_effects += 1
            s.commit()
        except Exception:  # noqa: BLE001 - e.g. the database itself is gone: the next tick tries again
            s.rollback()
            log.exception("job %s: could not record orchd's error on it", job.id)

    # ------------------------------------------------------------------ one job

    def _advance(self, s: Session, job: Job, observations: dict[str, Observation], now: float,
                 report: TickReport, live: Counter[str]) -> None:
        backend = self.backend_for(job.backend)
        att = job.current_attempt
        if job.cancel_requested_at is not None:  # `orchd cancel` recorded it; finish what it began
            self.finish_cancel(s, job, now)
            report.side_effects += 1
            return
        if att is None or not _live(att):
            if job.job_state == JobState.PENDING and (job.not_before is None or job.not_before <= now):
                limit = job.spec.max_parallel
                if job.sweep_id and limit and live[job.sweep_id] >= limit:
                    job.detail = f"waiting: {live[job.sweep_id]} of its sweep running (max_parallel {limit})"
                    return
                if not self._start(s, job, backend, now, report):
                    return  # launched by another orchd process: its id comes next
                report.started += 1
                report.side_effects += 1
                if job.sweep_id and _live(job.current_attempt):
                    live[job.sweep_id] += 1
            return
        assert att.backend_id is not None
        ob = observations.get(att.backend_id)
        if ob is not None and ob.state == JobState.PENDING and att.state == JobState.RUNNING.value \
                and not backend.requeues:  # "still launching" said of an attempt that already runs means
            ob = None  # it could not be reached (a launch another process finished): no news
        if ob is not None and ob.gone and att.state == JobState.PENDING.value:
            # never seen running, no instance, nobody launching it: orchd stopped before it rented one
            # (or what it rented went before its command was seen to run); nothing of the job ran here
            ob = Observation(JobState.FAILED, None, "launch interrupted (no instance: the orchd process launching "
                             "it stopped before renting one)", ended_at=now, launch_failed=True, relaunch=True)
        if ob is not None and ob.orphaned and att.state == JobState.PENDING.value and backend.launch_timeout \
                and now > (att.submitted_at or now) + backend.launch_timeout:
            why = (f"launch interrupted: the instance rented by an orchd process that stopped did not answer "
                   f"within {backend.launch_timeout:.0f}s (boot_timeout + ssh_timeout)")
            backend.cancel(att.backend_id)  # destroys what it rented (no artifacts: nothing ever ran there)
            record_action(s, job, "destroy", "instance destroyed: its launch was interrupted", now, att)
            ob = Observation(JobState.FAILED, None, why, ended_at=time.time(), launch_failed=True, relaunch=True)
        steps = backend.launch_steps(att.backend_id)  # rented, SSH up, uploaded: each given once, so
        for step in steps:  # committed at once, not lost if this job's tick fails further on
            record_action(s, job, "launch", step, now, att)
        if steps:
            self._commit(s, report)
        if att.usd_per_hour is None or att.state == JobState.PENDING.value:
            # a rented instance's price is known once it is rented, and exact once it is up
            rate = (backend.usd_per_hour(effective_spec(job, att), att.backend_id)
                    or (ob.usd_per_hour if ob is not None else None) or att.usd_per_hour)
            if rate != att.usd_per_hour:
                att.usd_per_hour = rate
        if ob is not None and ob.started_at is not None and att.started_at is None:
            att.started_at = ob.started_at  # billed from the create, while still launching
        elif ob is not None and ob.usd_per_hour and att.started_at is None:
            att.started_at = att.submitted_at  # launched by another process: it bills since the submit at most
        if ob is not None and ob.launch_failed:
            end_attempt(s, att, JobState.FAILED, f"launch failed: {ob.reason}", ob.ended_at or now)
            interrupted = _interrupted_before(job, att.number + 1)
            if ob.relaunch and interrupted <= MAX_RELAUNCHES:  # orchd's own stop, not the job's fault
                nxt = Attempt(job_id=job.id, number=att.number + 1, state=JobState.PENDING.value, submitted_at=now,
                              overrides_json=att.overrides_json, rule_state=att.rule_state)
                s.add(nxt)
                job.attempts.append(nxt)
                job.not_before = now
                record_action(s, job, "relaunch", f"{ob.reason}; attempt {nxt.number} launches anew", now, att)
                switch_state(s, job, JobState.PENDING, Reason.RETRY, ob.reason, now, att)
            else:
                record_action(s, job, "submit_failed", ob.reason, now, att)
                switch_state(s, job, JobState.FAILED, Reason.SUBMIT_ERROR, ob.reason, now, att)
            report.side_effects += 1
            return
        if ob is not None and ob.state == JobState.PENDING and att.state == JobState.RUNNING.value \
                and backend.requeues:  # the scheduler put it back in its queue: waiting, not running
            att.state = JobState.PENDING.value
            record_action(s, job, "requeued", f"attempt {att.number} is queued again by the scheduler"
                          + (f": {ob.reason}" if ob.reason else ""), now, att)
            switch_state(s, job, JobState.PENDING, Reason.QUEUED, ob.reason or "requeued by the scheduler", now, att)
            report.side_effects += 1
        if ob is not None and ob.state == JobState.PENDING and att.state == JobState.PENDING.value \
                and job.detail != ob.reason:
            job.detail = ob.reason  # queue reason / expected start / launch phase: shown, not an event
        if ob is not None and ob.state != JobState.PENDING and job.job_state == JobState.PENDING:
            att.state, att.last_log_at, att.started_at = JobState.RUNNING.value, now, att.started_at or now
            switch_state(s, job, JobState.RUNNING, Reason.STARTED, f"attempt {att.number}", now, att)
            if ob.state.terminal:  # it ran and ended between two ticks: that it ran stays recorded even
                self._commit(s, report)  # if ending it fails this tick (a destroy refused, say)
        lost = self._liveness(job, att, backend, ob, now)
        if lost is not None:
            ob = lost
        ended = ob is not None and ob.state.terminal
        if lost is not None:  # nothing can be read from an instance nobody reaches; the local copy has it
            events, at_end = [], True
        else:
            events, at_end = self._read_log(s, job, att, backend, ended, now, report, lost=ob is not None and ob.lost)
        if ended and not at_end:  # finish only once every logged value is read: the rest next tick
            job.detail = f"FINISHING: attempt {att.number} ended; reading its log (at byte {att.log_offset})"
        spec = effective_spec(job, att)
        state = att.rule_state_dict  # parsed once for the view and for best
        view = self._view(spec, att, job, s, events, state)
        decisions = rules.evaluate(view, events, now)
        self._remember_best(att, events, state)
        for d in decisions:
            report.decisions.append(f"job {job.id} {d.kind}")
            # an attempt that already ended keeps its own end (state, exit code); else it is stopped
            if not self._apply(s, job, att, backend, d, now, observation=ob if ended else None):
                report.side_effects += 1
                return  # the attempt is over
        if ended and at_end and ob is not None:
            view = self._view(spec, att, job)  # with what the decisions above recorded
            if ob.state in (JobState.FAILED, JobState.OUT_OF_MEMORY) and lost is None:
                ob = self._explain(att, backend, ob)
            if spec.submitit and ob.state != JobState.COMPLETED:  # what the function raised, as submitit kept it
                from orchestrator.adopt import submitit_failure

                if why := submitit_failure(spec.submitit, (att.backend_id or "").split("@")[0]):
                    ob = replace(ob, reason=f"{ob.reason}; {why}" if ob.reason else why)
            d = rules.on_attempt_end(view, rules.AttemptEnd(ob.state, ob.exit_code, ob.reason))
            report.decisions.append(f"job {job.id} {d.kind}")
            self._apply(s, job, att, backend, d, now, observation=ob)
            report.side_effects += 1  # an instance may have been destroyed: record it before the next job

    @staticmethod
    def _explain(att: Attempt, backend: Backend, ob: Observation) -> Observation:
        """A failed attempt's end with the error lines of its log's end (kept in its rule state
        for ``show`` and the mail) and a known cause (GPU out of memory, OOM-killed → OUT_OF_MEMORY;
        NCCL) in its reason. See orchestrator/explain.py."""
        from orchestrator.explain import TAIL_BYTES, explain

        try:
            start = max(0, att.log_offset - TAIL_BYTES)
            tail = backend.read_log(att.backend_id or "", start, att.log_offset - start)
        except Exception as e:  # noqa: BLE001 - an explanation is a courtesy: the end is recorded without it
            log.warning("attempt %s: cannot read its log's end to explain the failure: %s", att.id, e)
            return ob
        why = explain(tail, ob.exit_code)
        if why is None:
            return ob
        st = att.rule_state_dict
        st["error_lines"] = list(why.lines)
        att.rule_state = state_json(st)
        state = JobState.OUT_OF_MEMORY if why.out_of_memory else ob.state
        return replace(ob, state=state, reason=f"{ob.reason}; {why.message}" if ob.reason else why.message)

    @staticmethod
    def _liveness(job: Job, att: Attempt, backend: Backend, ob: Observation | None, now: float) -> Observation | None:
        """An end orchd decides for a running attempt on a rented instance the provider cannot be
        trusted to end: past ``time_limit`` + grace (TIMEOUT), or with no news at all for
        ``no_news_timeout`` seconds (NODE_FAIL, BACKEND_LOST). The last news is kept in the
        attempt's rule state (coarsely, once a minute) so every process sees it. None: no such end."""
        no_news = backend.no_news_timeout
        if no_news is None or att.state != JobState.RUNNING.value:
            return None
        st = att.rule_state_dict
        if ob is not None:
            if now - st.get("news_at", 0) >= min(60.0, no_news / 4):  # coarse: not a write per tick
                st["news_at"] = now
                att.rule_state = state_json(st)
            if ob.state.terminal:
                return None
        limit = effective_spec(job, att).resources.time_limit
        if limit and att.started_at and now > att.started_at + limit + backend.time_limit_grace:
            return Observation(JobState.TIMEOUT, None, f"time_limit {limit:.0f}s reached (ended by orchd: the "
                               "instance did not end it)", ended_at=now)
        last = max(st.get("news_at", 0), att.started_at or 0, att.last_log_at or 0)
        if ob is None and last and now - last > no_news:
            return Observation(JobState.NODE_FAIL, None, f"BACKEND_LOST: no news of the instance for "
                               f"{now - last:.0f}s (no_news_timeout {no_news:.0f}s)", ended_at=now)
        return None

    def _new_attempt(self, s: Session, job: Job, now: float) -> tuple[Attempt, SubmitRequest]:
        att = job.current_attempt
        if att is None or att.backend_id is not None or att.ended_at is not None:
            att = Attempt(job_id=job.id, number=len(job.attempts) + 1, state=JobState.PENDING.value,
                          submitted_at=now)
            s.add(att)
            job.attempts.append(att)
        return att, self._request(job, att)

    def _request(self, job: Job, att: Attempt) -> SubmitRequest:
        return SubmitRequest(job.id, att.number, effective_spec(job, att), self.settings.jobs_dir / str(job.id))

    def _start(self, s: Session, job: Job, backend: Backend, now: float, report: TickReport) -> bool:
        """Start the job's next attempt, exactly once: the intent (``submitting_at``) is committed
        before the backend is asked; an attempt found with an intent and no backend id may have
        been started by a process that died before recording it, so the backend is asked to find
        it (``Backend.find``) before anything is started again. Returns False when it was left to
        the orchd process launching it (a live launch lease, its backend id not recorded yet)."""
        att, req = self._new_attempt(s, job, now)
        if att.submitting_at is not None:
            found = backend.find(replace(req, token=_token(att)))
            if found is not None:
                self._submitted(s, job, att, req, backend, found, now, adopted=True)
                return True
            if (att.launch_lease_until or 0) > now:  # an orchd process (maybe on another host) launches it and
                job.detail = "LAUNCHING in another orchd process"  # has not recorded its id: it will, or its
                return False  # lease lapses (it died) and the attempt is started here
        before = att.submitting_at, att.launch_lease_until
        att.submitting_at = now
        req = replace(req, token=_token(att))
        if backend.leases_launches:  # in the intent's commit: whoever sees the attempt's id sees its lease
            att.launch_lease_until = time.time() + leases.LEASE_SECONDS
        try:
            backend.hold_launch(req)  # this process's, before the intent is: a kill after the commit is told at once
        except BackendError:  # another process launches it (find would have said so a moment ago)
            att.submitting_at, att.launch_lease_until = before
            job.detail = "LAUNCHING in another orchd process"
            return False
        try:
            self._commit(s, report)  # the intent first: whatever happens next, the start is found, not repeated
        except BaseException:
            backend.drop_launch(req.run_name)
            raise
        try:
            backend_id = backend.submit(req)
        except BackendError as e:
            self._submit_failed(s, job, att, e, now)
            return True
        self._submitted(s, job, att, req, backend, backend_id, now)
        return True

    def _submit_failed(self, s: Session, job: Job, att: Attempt, e: Exception, now: float) -> None:
        end_attempt(s, att, JobState.FAILED, f"submit failed: {e}", now)
        record_action(s, job, "submit_failed", str(e), now, att)
        switch_state(s, job, JobState.FAILED, Reason.SUBMIT_ERROR, str(e), now, att)

    def adopted(self, s: Session, job: Job, att: Attempt, backend: Backend, backend_id: str, now: float) -> None:
        """Record ``att`` as started outside orchd, as ``backend_id`` (``orchd watch``)."""
        self._submitted(s, job, att, self._request(job, att), backend, backend_id, now, adopted=True)

    def _submitted(self, s: Session, job: Job, att: Attempt, req: SubmitRequest, backend: Backend,
                   backend_id: str, now: float, adopted: bool = False) -> None:
        att.backend_id = backend_id
        att.submitted_at, att.last_log_at = now, now
        att.usd_per_hour = backend.usd_per_hour(req.spec, backend_id)  # the price at launch: prices move later
        att.gpus = req.spec.resources.nodes * req.spec.resources.gpus_per_node
        record_action(s, job, "adopt" if adopted else "submit",
                      f"attempt {att.number} {'found started' if adopted else 'submitted'} as {req.run_name} on "
                      f"{backend.name} ({att.backend_id})"
                      + (f" with override {att.overrides_json}" if att.override else ""), now, att)
        if backend.starts_immediately:
            att.state = JobState.RUNNING.value
            att.started_at = now
            switch_state(s, job, JobState.RUNNING, Reason.STARTED, f"attempt {att.number}", now, att)
        else:
            switch_state(s, job, JobState.PENDING, Reason.QUEUED, f"attempt {att.number} queued", now, att)

    def _start_arrays(self, s: Session, jobs: list[Job], now: float, report: TickReport) -> None:
        """Submit each sweep whose jobs all wait for their first attempt as one array job, where
        the backend has arrays (SLURM ``--array``, throttled by the spec's ``max_parallel``)."""
        sweeps: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            first = job.current_attempt
            unstarted = not job.attempts or (len(job.attempts) == 1 and first is not None and first.backend_id is None
                                             and first.ended_at is None and first.submitting_at is not None)
            if job.sweep_id and job.job_state == JobState.PENDING and unstarted and job.cancel_requested_at is None:
                sweeps[job.sweep_id].append(job)
        for members in sweeps.values():
            try:
                self._start_array(s, members, now, report)
            except Exception:  # noqa: BLE001 - one sweep's trouble is not the tick's; its jobs are retried as usual
                s.rollback()
                report.metric_rows.clear()
                log.exception("starting sweep %s as an array failed", members[0].sweep_id)

    def _start_array(self, s: Session, members: list[Job], now: float, report: TickReport) -> None:
        """Submit one sweep's first attempts as one array job (see _start_arrays)."""
        backend = self.backend_for(members[0].backend)
        if len(members) < 2 or not isinstance(backend, ArrayBackend) or members[0].spec.sbatch:
            return  # (a user's own batch script is submitted as it is, one job each)
        prepared = [(job, *self._new_attempt(s, job, now)) for job in members]
        ids = None
        if any(att.submitting_at is not None for _, att, _ in prepared):  # begun before, never recorded
            ids = backend.find_array([replace(req, token=_token(att)) for _, att, req in prepared])
        if ids is None:
            for _, att, _ in prepared:
                att.submitting_at = now
            self._commit(s, report)  # the intent first (see _start)
            try:
                ids = backend.submit_array([replace(req, token=_token(att)) for _, att, req in prepared])
            except BackendError as e:
                for job, att, _ in prepared:
                    self._submit_failed(s, job, att, e, now)
                self._commit(s, report)
                return
        for (job, att, req), backend_id in zip(prepared, ids, strict=True):
            self._submitted(s, job, att, req, backend, backend_id, now)
            record_action(s, job, "array", f"submitted with {len(members) - 1} other job(s) of its sweep as "
                          f"array {backend_id.split('_')[0]}", now, att)
        report.started += len(members)
        report.side_effects += 1
        self._commit(s, report)

    def _read_log(self, s: Session, job: Job, att: Attempt, backend: Backend, ended: bool, now: float,
                  report: TickReport, lost: bool = False) -> tuple[list[Event], bool]:
        """Parse the attempt's log from its stored offset, at most MAX_READ_PER_TICK bytes. Returns
        (events, whether the end of the log was reached). A log found shorter than the offset
        (truncated or rotated) is read again from its start, and that is recorded. ``lost``: its
        host is gone, so what cannot be read now is the end (its instance must not bill on)."""
        spec = effective_spec(job, att)
        parser = logread.parser_for(spec, ParserState.from_dict(att.parser_state_dict))
        events: list[Event] = []
        read = 0
        at_end = False
        while read < logread.MAX_READ_PER_TICK and len(events) < logread.MAX_SAMPLES_PER_TICK:
            try:
                data, skip = logread.read_new(backend, att.backend_id or "", att.log_offset, parser.state)
            except LogShrunk as e:
                record_action(s, job, "log_reset", f"{e.why(att.log_offset)}: reading it again from its start", now,
                              att)
                att.log_offset = 0
                parser = logread.parser_for(spec, ParserState())
                continue
            except LogUnreadable:
                raise  # not passing: counted against the job
            except BackendError as e:  # a dropped connection: no news this tick, the offset stays
                if lost:
                    log.warning("job %s: attempt %s's host is lost; its log ends at byte %d (%s)", job.id,
                                att.number, att.log_offset, e)
                    at_end = True
                    break
                log.warning("job %s: reading attempt %s's log: %s (the next tick goes on from byte %d)", job.id,
                            att.number, e, att.log_offset)
                break
            size = len(data) - skip
            if not size:
                at_end = True
                break
            read += size
            last = size < logread.READ_CHUNK
            new, consumed = parser.feed(data, att.log_offset, final=ended and last, skip=skip)
            events.extend(new)
            att.log_offset += consumed
            if last or consumed == 0:
                at_end = True
                break
        if read:
            att.last_log_at = now
        state = state_json(parser.state.to_dict())
        if state != att.parser_state:
            att.parser_state = state
        report.metric_rows.extend(logread.sample_rows(job.id, att.number, events, now))
        for ev in events:
            if isinstance(ev, KeysReport):
                s.add(KeysRow(job_id=job.id, attempt=att.number, kind=ev.kind, count=ev.count,
                              keys_json=json.dumps(list(ev.keys)), offset=ev.offset, at=now))
        report.bytes_read += read
        report.events += len(events)
        return events, at_end

    @staticmethod
    def _remember_best(att: Attempt, events: list[Event], state: dict[str, Any] | None = None) -> None:
        """Keep the lowest finite value of each metric in the attempt's rule state (``state``:
        that rule state, parsed, when the caller has it)."""
        if not events:
            return
        state = att.rule_state_dict if state is None else state
        rules.remember_best(state, events)
        text = state_json(state)
        if text != att.rule_state:
            att.rule_state = text

    @staticmethod
    def _view(spec: JobSpec, att: Attempt, job: Job, s: Session | None = None,
              events: list[Event] | None = None, state: dict[str, Any] | None = None) -> rules.JobView:
        st = att.rule_state_dict if state is None else state
        # the attempt's ordinal among those that ran: a launch orchd itself cut short (and launched
        # anew) spends none of the job's retry.max_attempts, and retry.overrides keep their numbers
        run = att.number - _interrupted_before(job, att.number)
        return rules.JobView(spec=spec, attempt=run, state=job.job_state, last_log_at=att.last_log_at,
                             best=st.get("best", {}), checked=frozenset(st.get("checked", [])),
                             success_met=frozenset(st.get("success_met", [])),
                             forecast=_success_forecast(s, job, spec, events or []) if s is not None else None)

    # ------------------------------------------------------------------ decisions

    def _apply(self, s: Session, job: Job, att: Attempt, backend: Backend, d: rules.Decision, now: float,
               observation: Observation | None) -> bool:
        """Carry out one decision. Returns False once the attempt is over."""
        st = att.rule_state_dict
        if d.kind == "checked":
            st["checked"] = sorted({*st.get("checked", []), d.condition})
            att.rule_state = state_json(st)
            record_action(s, job, "expectation_met", d.detail, now, att)
            return True
        if d.kind == "success":
            st["success_met"] = sorted({*st.get("success_met", []), d.condition})
            att.rule_state = state_json(st)
            record_action(s, job, "success", d.detail, now, att)
            if set(st["success_met"]) >= set(job.spec.success_conditions()):
                job.success_met_at = now
                self._notify(s, job, "success", f"success criteria met: {d.detail}", now)
            return True
        if observation is None:  # decided while the attempt runs: stop it first
            ended = self.release_attempt(s, job, att, backend, now, stop=True)
            end_attempt(s, att, JobState.CANCELLED if d.kind == "cancel" else JobState.FAILED, d.detail, ended)
        else:
            ended = self.release_attempt(s, job, att, backend, now, stop=False)
            end_attempt(s, att, observation.state, observation.reason or d.detail, ended, observation.exit_code)
        if d.kind == "retry":
            nxt = Attempt(job_id=job.id, number=att.number + 1, state=JobState.PENDING.value, submitted_at=now,
                          overrides_json=d.override.model_dump_json(exclude_defaults=True) if d.override else "{}",
                          rule_state=att.rule_state)  # checks passed and best values carry over
            s.add(nxt)
            job.attempts.append(nxt)
            job.not_before = now + d.delay
            record_action(s, job, "retry", f"{d.detail}; next attempt in {d.delay:.0f}s", now, att)
            switch_state(s, job, JobState.PENDING, Reason.RETRY, d.detail, now, att)
        else:
            record_action(s, job, d.kind, d.detail, now, att)
            switch_state(s, job, d.state, d.reason, d.detail, now, att)
            if d.state != JobState.COMPLETED:
                kind = {Reason.BAD_CHECKPOINT: "expectation", Reason.EXPECTATION: "expectation",
                        Reason.IDLE: "idle"}.get(d.reason, "failed")
                self._notify(s, job, kind, f"{d.state.value}: {d.reason.value}", now)
        return False

    # ------------------------------------------------------------------ money and mail

    def _notify(self, s: Session, job: Job, kind: str, what: str, now: float, key: str | None = None) -> None:
        # the body (the job's summary) is written when the alert is sent, from committed rows
        notify.raise_alert(s, key or f"{kind}:job:{job.id}", kind, f"[orchd] job {job.id} {job.name}: {what}", "",
                           self.config.email, self.config.notify, now, job)

    def _budgets(self, s: Session, now: float, report: TickReport) -> None:
        """Alert at each threshold a budget crosses (once), and stop its jobs at 100 %."""
        for scope, jobs in budget_scopes(s, self.config.budgets):
            if scope.fraction >= 1.0:  # stop first, so the mail tells the end state
                for job in jobs:
                    self._stop(s, job, f"budget exhausted: {scope.describe()}", now)
                    report.side_effects += 1
            for t in crossed(scope, self.config.budgets.alerts_at):
                what = f"budget {t:.0%} reached: {scope.describe()}"
                key = f"budget:{scope.key}:{t}"
                if scope.kind == "job":
                    self._notify(s, jobs[0], "budget", what, now, key=key)
                else:
                    active = ", ".join(f"{j.id} {j.name} {j.state} (${j.cost_usd:.2f})" for j in jobs) or "none"
                    body = f"{what}\n\nJobs: {active}\n\nLook closer: orchd costs --by project\n"
                    notify.raise_alert(s, key, "budget", f"[orchd] {what}", body, self.config.email,
                                       self.config.notify, now)

    def release_attempt(self, s: Session, job: Job, att: Attempt, backend: Backend, now: float, stop: bool) -> float:
        """An attempt is over: a rented instance gives up its artifacts and is destroyed (even when
        the job failed: nothing keeps billing); anything else is stopped if still running. Returns
        when billing stopped (epoch seconds): the end the attempt's cost runs to."""
        release = getattr(backend, "release", None)
        if release is not None:
            spec = effective_spec(job, att)
            got, stopped = release(att.backend_id or "", spec.artifacts, self.settings.jobs_dir / str(job.id) /
                                   f"a{att.number}" / "artifacts")
            record_action(s, job, "destroy", f"instance destroyed; artifacts downloaded: {got or 'none'}"
                          + (f" of {spec.artifacts}" if spec.artifacts else ""), now, att)
            return stopped
        if stop:
            backend.cancel(att.backend_id or "")
        return now

    def finish_cancel(self, s: Session, job: Job, now: float) -> None:
        """Carry out a recorded user cancel (``job.cancel_requested_at``): stop the attempt,
        including one whose start was begun but not recorded, and end the job CANCELLED (USER).
        Raises BackendError if the backend cannot stop it (the intent stays: tried again next tick)."""
        backend = self.backend_for(job.backend)
        att = job.current_attempt
        why = job.cancel_reason or "cancelled by user"
        if att is not None and att.ended_at is None:
            if att.backend_id is None and att.submitting_at is not None:
                att.backend_id = backend.find(replace(self._request(job, att), token=_token(att)))
            ended = now
            if att.backend_id:
                self._read_rest(s, job, att, backend, now)  # before a rented instance goes
                ended = self.release_attempt(s, job, att, backend, now, stop=True)
                if getattr(backend, "release", None) is None:
                    self._read_rest(s, job, att, backend, now)  # and what it wrote while stopping
            end_attempt(s, att, JobState.CANCELLED, why, ended)
        record_action(s, job, "cancel", why, now, att)
        switch_state(s, job, JobState.CANCELLED, Reason.USER, why, now, att)
        _account(job, now)

    def _read_rest(self, s: Session, job: Job, att: Attempt, backend: Backend, now: float) -> None:
        """Record what the attempt logged since the last read (a stop must not lose values).
        A log that cannot be read is logged, never a reason not to stop."""
        report = TickReport()
        try:
            self._read_log(s, job, att, backend, True, now, report)
        except Exception as e:  # noqa: BLE001 - the stop goes on whatever the log does
            log.warning("job %s: reading the rest of attempt %s's log: %s", job.id, att.number, e)
            return
        if report.metric_rows:
            logread.insert_samples(s, report.metric_rows)
            report.metric_rows.clear()

    def _stop(self, s: Session, job: Job, why: str, now: float) -> None:
        att = job.current_attempt
        if att is not None and _live(att):
            ended = self.release_attempt(s, job, att, self.backend_for(job.backend), now, stop=True)
            end_attempt(s, att, JobState.CANCELLED, why, ended)
        record_action(s, job, "cancel", why, now, att)
        switch_state(s, job, JobState.CANCELLED, Reason.BUDGET, why, now, att)
        _account(job, now)

