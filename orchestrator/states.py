"""Job and attempt states, spelled as SLURM spells them, and the one table of legal moves.

States follow squeue(1)/sacct(1) "JOB STATE CODES". A job waiting for a retry's backoff is
PENDING with reason ``RETRY`` (SLURM shows a requeued job as PENDING with reason BeginTime).
The *why* of an end state is a separate short reason code (``Reason``).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    NODE_FAIL = "NODE_FAIL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


ACTIVE = (JobState.PENDING, JobState.RUNNING)
TERMINAL = tuple(s for s in JobState if s.terminal)


class Reason(StrEnum):
    """Why a job is where it is; shown next to the state."""

    SUBMITTED = "SUBMITTED"
    STARTED = "STARTED"
    QUEUED = "QUEUED"                    # submitted to a queue (SLURM), not running yet
    RETRY = "RETRY"                      # waiting for the backoff before the next attempt
    SUCCESS = "SUCCESS"                  # exit 0, expectations and success criteria met
    NONZERO_EXIT = "NONZERO_EXIT"
    USER = "USER"                        # orchd cancel
    BAD_CHECKPOINT = "BAD_CHECKPOINT"    # missing/unexpected keys broke an expectation
    EXPECTATION = "EXPECTATION"          # a metric expectation or success criterion failed
    EARLY_STOP = "EARLY_STOP"            # a cancel_if rule fired
    RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"
    BACKEND_LOST = "BACKEND_LOST"        # the backend no longer knows the attempt
    SUBMIT_ERROR = "SUBMIT_ERROR"
    TIME_LIMIT = "TIME_LIMIT"
    BUDGET = "BUDGET"
    NO_CAPACITY = "NO_CAPACITY"
    IDLE = "IDLE"                        # shutdown.idle: the log stopped growing; instance released
    ORCHD_ERROR = "ORCHD_ERROR"          # orchd itself failed on this job tick after tick (see its actions)


# from-state -> states it may move to. Terminal states are final.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, *TERMINAL}),
    JobState.RUNNING: frozenset({JobState.PENDING, *TERMINAL}),
    **{s: frozenset() for s in TERMINAL},
}


class IllegalTransition(ValueError):
    """A state change the table does not allow (a bug, or a race lost to another writer)."""


def check_transition(old: JobState, new: JobState) -> None:
    """Raise IllegalTransition unless ``old -> new`` is allowed (``old == new`` always is)."""
    if old != new and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal job state change")
