"""What the CLI does, without the CLI: open the database, submit specs, describe and cancel
jobs. Every function takes an ``App`` (settings, sessions, backends) so tests can use one.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator import listing
from orchestrator.app import App, open_app  # noqa: F401 - the service's entry points
from orchestrator.backends import backend_key
from orchestrator.backends.base import Backend
from orchestrator.costs import budget_scopes, summarize, usage_rows
from orchestrator.errors import BudgetError, JobNotFound, OrchdError, TickBusy
from orchestrator.models import Action, Attempt, Event, Heartbeat, Job, KeysReport, MetricSample
from orchestrator.spec import JobSpec
from orchestrator.specfile import load_spec_file
from orchestrator.states import JobState, Reason

log = logging.getLogger("orchd.service")


def projected_usd(app: App, spec: JobSpec) -> float | None:
    """$/hr now x time_limit: the most one attempt can cost (None if unpriced or unlimited)."""
    rate = app.backend(backend_key(spec.backend, spec.cluster)).usd_per_hour(spec)
    if not rate or not spec.resources.time_limit:
        return None
    return rate * spec.resources.time_limit / 3600


def check_budgets(app: App, specs: list[JobSpec]) -> None:
    """Raise BudgetError if the jobs' projected cost cannot fit in a budget that covers them."""
    projected = [projected_usd(app, sp) for sp in specs]
    with app.sessions() as s:
        scopes = [sc for sc, _ in budget_scopes(s, app.config.budgets) if sc.kind != "job" and sc.max_usd]
    for sc in scopes:
        mine = [p for sp, p in zip(specs, projected, strict=True)
                if p is not None and (sc.kind == "total" or sp.project == sc.name)]
        left = sc.max_usd - sc.usd if sc.max_usd else None
        if mine and left is not None and sum(mine) > left:
            raise BudgetError(f"projected ${sum(mine):.2f} ($/hr x time_limit for {len(mine)} job(s)) does not fit "
                              f"in what remains of {sc.kind} {sc.name}: ${left:.2f} of ${sc.max_usd:.2f}; "
                              "submit with --force to run anyway")
    for sp, p in zip(specs, projected, strict=True):
        if p is not None and sp.budget and sp.budget.max_usd and p > sp.budget.max_usd:
            raise BudgetError(f"{sp.name}: projected ${p:.2f} exceeds its budget.max_usd ${sp.budget.max_usd:.2f}; "
                              "submit with --force to run anyway (it is stopped at the limit)")


def submit(app: App, spec_path: str | Path, start_now: bool = True, force: bool = False) -> list[int]:
    """Validate a spec file and record its job(s) as PENDING; returns the new job ids.

    Raises SpecError, ConfigError or BudgetError (unless ``force``) before anything is written.
    With ``start_now`` a tick runs at once (if no other tick holds the lock) so the job starts
    without waiting for the daemon.
    """
    specs: list[JobSpec] = load_spec_file(spec_path)
    # an unknown cluster or backend fails here, before anything is written; profile defaults fill in
    specs = [app.backend(backend_key(sp.backend, sp.cluster)).complete(sp) for sp in specs]
    if not force:
        check_budgets(app, specs)
    now = time.time()
    sweep_id = uuid.uuid4().hex[:12] if len(specs) > 1 else None
    with app.sessions.begin() as s:
        jobs = []
        for spec in specs:
            job = Job(name=spec.name, sweep_id=sweep_id, project=spec.project,
                      backend=backend_key(spec.backend, spec.cluster),
                      state=JobState.PENDING.value, reason=Reason.SUBMITTED.value, detail="",
                      spec_json=spec.model_dump_json(), spec_path=str(Path(spec_path).resolve()),
                      created_at=now, cost_usd=0.0)
            s.add(job)
            jobs.append(job)
        s.flush()
        for job in jobs:
            s.add(Event(job_id=job.id, at=now, from_state=None, to_state=JobState.PENDING.value,
                        reason=Reason.SUBMITTED.value, detail=f"from {spec_path}"))
        ids = [j.id for j in jobs]
    if start_now:
        try:
            app.ticker.tick()
        except TickBusy:
            pass  # a daemon is ticking: it will start the job
    return ids


def dry_run(app: App, spec_path: str | Path) -> str:
    """What ``submit`` would do with SPEC, as text, starting and writing nothing: per job its
    backend and command, the rendered sbatch script (slurm), what would be uploaded and what is
    kept home (vastai, runpod), the projected cost. Raises SpecError or ConfigError."""
    from orchestrator import uploads
    from orchestrator.backends.base import ArrayBackend, SubmitRequest
    from orchestrator.backends.cloud import CloudBackend

    out = []
    specs = load_spec_file(spec_path)
    for i, sp in enumerate(specs, 1):
        key = backend_key(sp.backend, sp.cluster)
        backend = app.backend(key)
        sp = backend.complete(sp)
        cost = projected_usd(app, sp)
        out.append(f"== job {i} of {len(specs)}: {sp.name} on {key}"
                   + (f", at most ${cost:.2f} per attempt ($/hr x time_limit)" if cost is not None else ""))
        out.append(f"command: {sp.command}" if sp.command else f"sbatch: {sp.sbatch} (your script, unchanged)")
        if sp.env:
            out.append("env: " + ", ".join(sorted(sp.env)))
        req = SubmitRequest(0, 1, sp, app.settings.jobs_dir / "DRY-RUN", token="dry-run")
        if isinstance(backend, ArrayBackend) and sp.sbatch:
            out.append("sbatch command: " + shlex.join(["sbatch", "--parsable",
                                                        *backend.own_script_options(req, "<log>"), "<script>"]))
        elif isinstance(backend, ArrayBackend):
            out.append("sbatch script:")
            out.append(backend.render_script([req], "<log>").rstrip())
        if isinstance(backend, CloudBackend):
            p = uploads.plan(sp, app.settings.home)
            out.append(f"upload: {len(p.files)} file(s), {p.bytes / 1e6:.2f} MB from {p.root}")
            out += [f"  kept home: {rel}  ({why})" for rel, why in p.kept]
    return "\n".join(out) + "\n"


def costs(app: App, by: str = "job") -> list[dict[str, Any]]:
    """Spend grouped ``by`` job | project | backend | day (see costs.summarize)."""
    with app.sessions() as s:
        return summarize(usage_rows(listing.session_reader(s)), by)


def get_job(s: Session, job_id: int) -> Job:
    """The job ``job_id``; raises JobNotFound (also for ids no database integer can hold)."""
    job = s.get(Job, job_id) if 0 < job_id < 2**63 else None
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def _command(job: Job) -> str:
    try:
        return job.spec.command or f"sbatch {job.spec.sbatch}"
    except ValueError as e:  # shown, not raised: `orchd show` must work on the job that has it
        return f"(the stored spec cannot be read: {str(e).splitlines()[0]})"


def _rule_state(att: Attempt) -> dict[str, Any]:
    try:
        state = json.loads(att.rule_state or "{}")
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def _rule_facts(att: Attempt) -> dict[str, list[str]]:
    """What ``show`` gives of an attempt's rule state: the success criteria it met and the error
    lines of its log's end (see explain.py)."""
    st = _rule_state(att)
    return {"success_met": st.get("success_met", []), "error_lines": st.get("error_lines", [])}


def _value(v: float | None) -> float:
    return math.nan if v is None else v


def _elapsed(job: Job, now: float) -> float | None:
    if job.started_at is None:
        return None
    return (job.ended_at or now) - job.started_at


def count_jobs(app: App, include_all: bool = False, now: float | None = None) -> int:
    """How many jobs ``job_summaries`` would list without a limit."""
    with listing.open_reader(app) as r:
        return listing.count_jobs(r, include_all, now)


def job_summaries(app: App, include_all: bool = False, now: float | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """What ``orchd status`` shows, one dict per job: see ``listing.job_summaries``."""
    with listing.open_reader(app) as r:
        return listing.job_summaries(r, include_all, now, limit)


def _forecast(s: Session, job: Job) -> dict[str, Any] | None:
    """The forecast of an active job (see ``listing.forecast_of``); None once it ended."""
    return None if job.job_state.terminal else listing.forecast_of(listing.session_reader(s), job.id,
                                                                                job.spec_json)


def _progress(s: Session, job: Job, now: float) -> dict[str, Any] | None:
    """The running attempt's progress (see ``listing.progress``), or None when no attempt runs."""
    return listing.progress(listing.session_reader(s), job.id, job.spec_json,
                            listing.attempt_row(job.current_attempt), now)


def _progress_model(s: Session, job: Job, now: float) -> tuple[Any, int | None] | None:
    """(``eta.Progress`` of the running attempt, the success criterion's step or None), or None."""
    return listing.progress_model(listing.session_reader(s), job.id, job.spec_json,
                                  listing.attempt_row(job.current_attempt), now)


def queue_wait(app: App, s: Session, job: Job) -> tuple[float, str]:
    """How long a new attempt of ``job`` would wait to start (seconds) and where that figure comes
    from: the backend's own estimate when it has one (SLURM: ``sbatch --test-only``), else the
    median wait (submitted → started) of this backend's last 20 attempts that started, else 0."""
    ask = getattr(app.backend(job.backend), "expected_wait", None)
    if ask is not None:
        try:
            wait = ask(job.spec)
        except OrchdError as e:
            log.warning("job %s: no queue estimate from %s: %s", job.id, job.backend, e)
            wait = None
        if wait is not None:
            return wait, "sbatch --test-only"
    waits = [st - sub for st, sub in s.execute(
        select(Attempt.started_at, Attempt.submitted_at).join(Job).where(
            Job.backend == job.backend, Attempt.started_at.is_not(None)).order_by(Attempt.id.desc()).limit(20))]
    if waits:
        return max(0.0, statistics.median(waits)), f"median of {len(waits)} recent attempt(s) on {job.backend}"
    return 0.0, "no attempt on this backend has started yet"


def whatif(app: App, job_id: int, steps: int | None = None, fix_s: float = 0.0, queue_s: float | None = None,
           now: float | None = None) -> Any:
    """Continue vs. fix and restart for a running job (``whatif.WhatIf``). ``steps``: the
    restart's steps (default: the target step: the success criterion's, else the run's total);
    ``fix_s``/``queue_s``: seconds of fixing and of queueing (default: see ``queue_wait``).
    Raises JobNotFound, or ValueError when the job does not run or its rates are not known yet."""
    from orchestrator.whatif import compare

    now = time.time() if now is None else now
    with app.sessions() as s:
        job = get_job(s, job_id)
        got = _progress_model(s, job, now)
        if got is None:
            raise ValueError(f"job {job_id} is {job.state}: only a running job can be continued or restarted")
        p, target = got
        target = target or p.total_steps
        if target is None:
            raise ValueError(f"job {job_id}: no target step known (no 'success: ... by step N', no N/T in its log, "
                             "no resources.total_steps)")
        queue_from = "given"
        if queue_s is None:
            queue_s, queue_from = queue_wait(app, s, job)
        att = job.current_attempt
        return compare(job_id, p, target, steps or target, fix_s, queue_s, spent_s=_elapsed(job, now) or 0.0,
                       spent_usd=job.cost_usd, gpus=att.gpus if att else 0,
                       usd_per_hour=att.usd_per_hour if att else None, queue_from=queue_from)


def job_detail(app: App, job_id: int) -> dict[str, Any]:
    """Everything recorded of a job: attempts, state history, metric series, key reports, actions."""
    with app.sessions() as s:
        return detail(s, job_id)


def detail(s: Session, job_id: int) -> dict[str, Any]:
    """``job_detail`` in an open session. Raises JobNotFound."""
    j = get_job(s, job_id)
    metrics: dict[str, list[dict[str, Any]]] = {}
    for m in s.scalars(select(MetricSample).where(MetricSample.job_id == job_id).order_by(MetricSample.id)):
        metrics.setdefault(m.name, []).append({"step": m.step, "epoch": m.epoch, "value": _value(m.value),
                                               "attempt": m.attempt, "at": m.at})
    keys: dict[str, list[str]] = {"missing": [], "unexpected": []}
    counts: dict[str, int | None] = {"missing": None, "unexpected": None}
    for r in s.scalars(select(KeysReport).where(KeysReport.job_id == job_id).order_by(KeysReport.id)):
        keys[r.kind], counts[r.kind] = json.loads(r.keys_json), r.count  # the latest report wins
    return {
        "id": j.id, "name": j.name, "backend": j.backend, "state": j.state, "reason": j.reason,
        "detail": j.detail, "spec_path": j.spec_path, "created_at": j.created_at, "started_at": j.started_at,
        "ended_at": j.ended_at, "cost_usd": j.cost_usd, "success_met_at": j.success_met_at,
        "command": _command(j), "progress": _progress(s, j, time.time()), "forecast": _forecast(s, j),
        "attempts": [{"number": a.number, "state": a.state, "exit_code": a.exit_code, "reason": a.reason,
                      "backend_id": a.backend_id, "submitted_at": a.submitted_at, "ended_at": a.ended_at,
                      "log_offset": a.log_offset, "usd_per_hour": a.usd_per_hour, "cost_usd": a.cost_usd,
                      "gpu_hours": a.gpu_hours, "override": json.loads(a.overrides_json or "{}"),
                      **_rule_facts(a)}
                     for a in j.attempts],
        "events": [{"at": e.at, "attempt": e.attempt, "from": e.from_state, "to": e.to_state,
                    "reason": e.reason, "detail": e.detail}
                   for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))],
        "metrics": metrics,
        "missing_keys": keys["missing"], "missing_keys_count": counts["missing"],
        "unexpected_keys": keys["unexpected"], "unexpected_keys_count": counts["unexpected"],
        "actions": [{"at": a.at, "attempt": a.attempt, "kind": a.kind, "reason": a.reason}
                    for a in s.scalars(select(Action).where(Action.job_id == job_id).order_by(Action.id))],
    }


def cancel(app: App, job_id: int, reason: str = "cancelled by user") -> str:
    """Cancel a job: record the intent (committed first: if this process dies, the next tick
    finishes the cancel, and no retry rule treats the attempt's end as a failure), then stop its
    running attempt (whole process group / scancel / instance destroyed) and mark it CANCELLED.
    Waits up to 120 s for a running tick. Returns what happened."""
    with app.sessions.begin() as s:
        job = get_job(s, job_id)
        if job.job_state.terminal:
            return f"job {job_id} already ended ({job.state})"
        if job.cancel_requested_at is None:
            job.cancel_requested_at, job.cancel_reason = time.time(), reason
    try:
        with app.ticker.lock("tick", timeout=120), app.sessions.begin() as s:
            job = get_job(s, job_id)
            if job.job_state.terminal:
                return f"job {job_id} ended ({job.state}, {job.reason})"
            app.ticker.finish_cancel(s, job, time.time())
    except TickBusy:
        return f"job {job_id}: cancel recorded; a tick still runs, and the next tick stops the job"
    return f"job {job_id} cancelled"


def log_source(app: App, job_id: int, attempt: int | None = None) -> tuple[Backend, Attempt, bool]:
    """(backend, attempt, job_is_active) for reading an attempt's log (default: the latest)."""
    with app.sessions() as s:
        job = get_job(s, job_id)
        atts = [a for a in job.attempts if a.backend_id and (attempt is None or a.number == attempt)]
        if not atts:
            raise JobNotFound(f"job {job_id} has no {'attempt ' + str(attempt) if attempt else 'started attempt'}")
        return app.backend(job.backend), atts[-1], not job.job_state.terminal


def next_attempt(app: App, job_id: int, after: int) -> tuple[Attempt, str] | None:
    """The first attempt of the job numbered above ``after`` that has started (has a backend
    id), with how attempt ``after`` ended ("FAILED: exit 3"); or None. What ``orchd logs -f``
    moves on to when a retry starts."""
    with app.sessions() as s:
        nxt = s.scalar(select(Attempt).where(Attempt.job_id == job_id, Attempt.number > after,
                                             Attempt.backend_id.is_not(None)).order_by(Attempt.number).limit(1))
        if nxt is None:
            return None
        prev = s.scalar(select(Attempt).where(Attempt.job_id == job_id, Attempt.number == after))
        return nxt, (f"{prev.state}: {prev.reason}" if prev is not None else "")


def job_state(app: App, job_id: int) -> JobState:
    with app.sessions() as s:
        return get_job(s, job_id).job_state


def attempt_script(app: App, job_id: int, attempt: int | None = None) -> str:
    """The batch script kept for an attempt (slurm backends keep ``a<n>/job.sbatch``)."""
    with app.sessions() as s:
        job = get_job(s, job_id)
        number = attempt or (job.current_attempt.number if job.current_attempt else 0)
    path = app.settings.jobs_dir / str(job_id) / f"a{number}" / "job.sbatch"
    if not path.exists():
        raise JobNotFound(f"job {job_id} attempt {number} has no batch script (only slurm attempts do)")
    return path.read_text()


def changed_since(app: App, since: float) -> list[int]:
    """Ids of the jobs that changed at or after ``since`` (epoch s): a state change, an action,
    or a metric sample; ascending."""
    with app.sessions() as s:
        return changed_job_ids(s, since)


def changed_job_ids(s: Session, since: float) -> list[int]:
    """``changed_since`` in an open session."""
    ids: set[int] = set()
    for model in (Event, Action, MetricSample):
        ids.update(s.scalars(select(model.job_id).where(model.at >= since).distinct()))
    return sorted(ids)


def reports(app: App, job_ids: list[int]) -> list[Any]:
    """The ``report.JobReport`` of each job (see orchestrator/report.py). Raises JobNotFound."""
    with app.sessions() as s:
        return reports_in(s, job_ids)


def reports_in(s: Session, job_ids: list[int]) -> list[Any]:
    """``reports`` in an open session."""
    from orchestrator.report import build

    out = []
    for job_id in job_ids:
        d = detail(s, job_id)
        try:
            spec = get_job(s, job_id).spec
        except ValueError:
            spec = None  # the report says what was recorded, without the spec's expectations
        out.append(build(d, spec))
    return out


def beat(app: App, name: str = "watcher", now: float | None = None) -> None:
    """Record that ``name`` ran now (the daemon and ``orchd poll`` after each tick)."""
    now = time.time() if now is None else now
    with app.sessions.begin() as s:
        row = s.get(Heartbeat, name)
        if row is None:
            s.add(Heartbeat(name=name, at=now))
        else:
            row.at = now


def beat_age(app: App, name: str = "watcher", now: float | None = None) -> float | None:
    """Seconds since ``name`` last ran, or None if it never did."""
    with listing.open_reader(app) as r:
        return listing.beat_age(r, name, now)
