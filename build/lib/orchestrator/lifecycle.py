"""The only writers of job state: every change is checked against the transition table and
leaves an ``Event`` row; every decision leaves an ``Action`` row. Callers own the transaction.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from orchestrator.models import Action, Attempt, Event, Job
from orchestrator.states import JobState, Reason, check_transition


def switch_state(session: Session, job: Job, new: JobState, reason: Reason, detail: str, now: float,
                 attempt: Attempt | None = None) -> None:
    """Move ``job`` to ``new`` (raises states.IllegalTransition if the table forbids it)."""
    old = job.job_state
    check_transition(old, new)
    if old == new and job.reason == reason and job.detail == detail:
        return
    job.state, job.reason, job.detail = new.value, reason.value, detail
    if new == JobState.RUNNING and job.started_at is None:
        job.started_at = now
    if new.terminal:
        job.ended_at = now
    session.add(Event(job_id=job.id, attempt=attempt.number if attempt else None, at=now,
                      from_state=old.value, to_state=new.value, reason=reason.value, detail=detail))


def end_attempt(session: Session, attempt: Attempt, state: JobState, reason: str, now: float,
                exit_code: int | None = None) -> None:
    """Record the end of an attempt (once; later calls keep the first end)."""
    if attempt.ended_at is not None:
        return
    session.add(Event(job_id=attempt.job_id, attempt=attempt.number, at=now, from_state=attempt.state,
                      to_state=state.value, reason="ATTEMPT_END", detail=reason))
    attempt.state, attempt.reason, attempt.ended_at = state.value, reason, now
    if exit_code is not None:
        attempt.exit_code = exit_code


def record_action(session: Session, job: Job, kind: str, reason: str, now: float,
                  attempt: Attempt | None = None) -> None:
    """Append a decision (``kind``: submit, cancel, retry, success, expectation, finish, ...)."""
    session.add(Action(job_id=job.id, attempt=attempt.number if attempt else None, at=now, kind=kind,
                       reason=reason))
