"""The interface every backend implements (local, slurm, runpod, vastai).

Contract (after dstack's ``Compute`` and submitit's batched watcher): ``submit`` returns as
soon as the attempt exists; ``poll`` answers for many attempts in one call and leaves out
the ones it has no news of (a failed poll is "no news", never a state change); ``read_log``
returns bytes from an offset; ``cancel`` is idempotent and must stop billing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from orchestrator.errors import BackendError
from orchestrator.spec import JobSpec
from orchestrator.states import JobState

NO_LEASES: Mapping[str, str] = MappingProxyType({})  # poll's default: no launch leased


@dataclass(frozen=True)
class SubmitRequest:
    """One attempt to start. ``run_name`` is predictable (``orchd-<job>-a<n>``) so a restarted
    orchd can find what it started; ``job_dir`` persists across attempts (checkpoints)."""

    job_id: int
    attempt: int
    spec: JobSpec
    job_dir: Path
    token: str = ""  # the attempt's idempotency token (same in every orchd process): see Backend.find

    @property
    def run_name(self) -> str:
        return f"orchd-{self.job_id}-a{self.attempt}"


@dataclass(frozen=True)
class Observation:
    """What the backend says of an attempt. ``exit_code`` follows the shell: 128+N when killed
    by signal N. ``started_at`` (billing began: a rented instance's create) and ``ended_at``
    in epoch seconds when known. ``launch_failed``: it never started (the job fails with
    SUBMIT_ERROR, as if the submit had failed). ``lost``: the host it ran on is gone or can no
    longer be trusted, so its log is read only as far as it still can be (never waited for).
    ``relaunch``: with ``launch_failed``, the launch was cut short by orchd itself (the process
    launching it died), not by the job or the provider: the job gets a new attempt instead of
    failing. ``orphaned``: PENDING, rented by an orchd process that is gone and launched by none
    (the tick ends it past ``Backend.launch_timeout`` from its submit). ``gone``: with ``lost``,
    the instance does not exist at all (nothing left to destroy): for an attempt never seen
    running, a launch cut short before it rented, which the tick launches anew."""

    state: JobState
    exit_code: int | None = None
    reason: str = ""
    ended_at: float | None = None
    started_at: float | None = None
    launch_failed: bool = False
    usd_per_hour: float | None = None  # the price the provider bills it at, USD/hr, when it says
    lost: bool = False
    relaunch: bool = False
    orphaned: bool = False
    gone: bool = False


class LogUnreadable(BackendError):
    """The log exists but can never be read as it is (not a regular file, no permission): not a
    passing trouble, so the tick counts it against the job (ORCHD_ERROR after a few ticks)."""


class LogShrunk(BackendError):
    """The log is shorter (``size`` bytes) than the offset asked for: truncated or rotated."""

    def __init__(self, size: int, message: str = ""):
        super().__init__(message or f"the log is {size} bytes, shorter than the offset read so far")
        self.size = size

    def why(self, offset: int) -> str:
        """The action text the tick records when it reads the log again from its start."""
        return f"the log shrank from {offset} to {self.size} bytes (truncated or rotated)"


class LogRewritten(LogShrunk):
    """The bytes just before the offset are not the ones read there: the log was truncated and
    written again past the offset between two reads (SLURM's requeue truncates the output file
    unless ``--open-mode=append``; a program that reopens its log with mode "w")."""

    def __init__(self, offset: int):
        super().__init__(offset, f"the log's bytes before offset {offset} are not the ones read there: rewritten "
                         "in place")

    def why(self, offset: int) -> str:
        return f"the log was rewritten in place (its bytes before offset {offset} changed)"


class Backend(ABC):
    name: str
    starts_immediately = True  # False for queues: the attempt waits PENDING until a poll says RUNNING
    requeues = False  # True where the scheduler may put a running attempt back in its queue (SLURM)
    # Liveness the tick enforces for a backend whose attempts can go silent (rented instances):
    # seconds without any news before a RUNNING attempt is ended NODE_FAIL (None: never), and
    # seconds past time_limit before orchd ends it TIMEOUT itself
    no_news_timeout: float | None = None
    time_limit_grace: float = 0.0
    # seconds after its submit by which an orphaned launch (see Observation.orphaned) must have
    # answered: past it, the tick destroys what was rented and launches the attempt again
    launch_timeout: float | None = None
    # True where a poll that says RUNNING (or nothing) means nothing changed but the log: the
    # tick may take such an attempt on its fast path (orchestrator/quiet.py). Rented instances:
    # False (launch steps, prices and liveness are orchd's own to track)
    reports_every_change = True
    # True where a launch runs off the tick for minutes and another home on the database could
    # take it for abandoned (rented instances): the attempt's launch lease is committed with its
    # intent, before the backend is asked (orchestrator/leases.py), and renewed by the launcher
    leases_launches = False

    @abstractmethod
    def submit(self, req: SubmitRequest) -> str:
        """Start the attempt; return its backend id. Raises BackendError."""

    @abstractmethod
    def poll(self, ids: list[str], leased: Mapping[str, str] = NO_LEASES) -> dict[str, Observation]:
        """Observations for the ids the backend has news of (batched: one call for all).
        ``leased``: the ids whose launch an orchd process vouches for in the database
        (orchestrator/leases.py), each with its intent's token (``SubmitRequest.token``): never
        to be taken for an abandoned launch."""

    @abstractmethod
    def read_log(self, backend_id: str, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the attempt's log from byte ``offset`` (b"" if none yet).
        Raises LogShrunk when the log is shorter than ``offset`` (where the backend can tell),
        BackendError when it cannot be read."""

    def hold_launch(self, req: SubmitRequest) -> None:
        """Called before the tick commits ``req``'s intent (``req.token``), then ``submit`` or
        ``drop_launch``: a backend whose launch outlives the tick marks it as this process's here,
        so that a process killed between the commit and the launch is told from a live launcher
        at once. Raises BackendError when another process holds the launch. No-op by default."""
        return None

    def drop_launch(self, run_name: str) -> None:
        """Undo ``hold_launch`` when the intent was not committed. No-op by default."""
        return None

    def find(self, req: SubmitRequest) -> str | None:
        """The backend id of an attempt already started for ``req`` (by ``req.run_name`` and
        ``req.token``), or None if none was: asked before starting an attempt again whose start
        was begun but never recorded (orchd killed between the start and its commit)."""
        return None

    @abstractmethod
    def cancel(self, backend_id: str) -> None:
        """Stop the attempt (idempotent: an attempt already gone is not an error)."""

    def complete(self, spec: JobSpec) -> JobSpec:
        """``spec`` with the backend's defaults filled in where the spec is silent (a cluster
        profile's ``gpus_per_node``); applied once, at submit, so the stored spec is what runs."""
        return spec

    def launch_steps(self, backend_id: str) -> list[str]:
        """What starting ``backend_id`` did, step by step (rented, SSH up, uploaded), for the job's
        events; each step is returned once."""
        return []

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        """The price of an attempt of ``spec`` (the one just started as ``backend_id``), USD/hr
        (None: free / not priced)."""
        return None


class ArrayBackend(Backend):
    """A backend that starts a sweep's first attempts as one array job (SLURM ``--array``)."""

    @abstractmethod
    def submit_array(self, reqs: list[SubmitRequest]) -> list[str]:
        """Start one array job for ``reqs``; one backend id per request, in order. Raises BackendError."""

    @abstractmethod
    def find_array(self, reqs: list[SubmitRequest]) -> list[str] | None:
        """The backend ids of an array already started for ``reqs`` (see ``find``), or None."""
