"""Backend ``local``: attempts run as processes on this machine, detached from orchd.

Each attempt gets ``<jobs_dir>/<job>/a<n>/`` holding ``output.log``, ``started`` (created once,
exclusively: a second start of the same attempt does nothing), ``runner.json`` and, when it
ends, ``result.json`` written by ``local_runner`` (so the exit code is known even if no orchd
process was alive at the time). The backend id is that directory. ``time_limit`` is enforced by
the runner (TIMEOUT); cancel signals the runner, which stops the whole process group.

Every process of an attempt carries ``ORCHD_ATTEMPT_DIR=<its directory>`` in its environment,
so when the runner is gone (``kill -9``) whatever it started is still found in ``/proc`` and
stopped before the attempt is reported lost (a retry never runs beside its predecessor).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from orchestrator.backends.base import NO_LEASES, Backend, Observation, SubmitRequest
from orchestrator.backends.local_runner import GRACE, STARTED, proc_start_time
from orchestrator.backends.pidwatch import PidWatch
from orchestrator.backends.shell import read_regular_file
from orchestrator.errors import BackendError
from orchestrator.spec import JobSpec
from orchestrator.states import JobState

STARTING_SECONDS = 30.0  # a runner that has claimed its attempt writes runner.json within this
# one answer for every running attempt (Observations are frozen): 10,000 of their own, alive
# through a whole tick, were promoted to the oldest GC generation each tick and brought on a
# full collection (~0.5 s at 10,000 jobs) every ~5 ticks
RUNNING = Observation(JobState.RUNNING)


def _read_json(path: Path | str) -> dict | None:
    """The JSON object in ``path``; None if it is missing or not (yet) whole JSON."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def attempt_processes(run_dir: Path) -> list[int]:
    """Live (non-zombie) processes whose environment has ``ORCHD_ATTEMPT_DIR=<run_dir>``
    (proc(5): ``/proc/PID/environ``, NUL-separated)."""
    marker = f"ORCHD_ATTEMPT_DIR={run_dir}".encode()
    me = os.getpid()
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            if marker not in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        if proc_start_time(int(p)) is not None:
            out.append(int(p))
    return out


def kill_attempt(run_dir: Path, timeout: float = 5.0) -> bool:
    """SIGKILL every process of the attempt (see ``attempt_processes``); True once none is left."""
    deadline = time.time() + timeout
    while pids := attempt_processes(run_dir):
        if time.time() > deadline:
            return False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return True


class LocalBackend(Backend):
    """Runs attempts under ``jobs_dir``; an hour costs ``usd_per_hour`` (config ``local:``, default 0)."""

    name = "local"

    def __init__(self, jobs_dir: Path, usd_per_hour: float = 0.0, base_env: dict[str, str] | None = None):
        self.jobs_dir = jobs_dir
        self.rate = usd_per_hour
        self.base_env = base_env  # what jobs inherit (config.job_environ: no secrets); None: orchd's own
        self._runners: dict[str, tuple[int, object]] = {}  # run dir -> (runner pid, its start time)
        self._watch = PidWatch()  # the verified runners, as pidfds: one epoll_wait a poll

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        return self.rate or None

    def find(self, req: SubmitRequest) -> str | None:
        """The attempt's directory if a runner has claimed it (``started`` exists)."""
        run_dir = req.job_dir / f"a{req.attempt}"
        return str(run_dir) if (run_dir / STARTED).exists() else None

    def submit(self, req: SubmitRequest) -> str:
        """Start the attempt's runner (at most once per attempt: see local_runner). Raises BackendError."""
        run_dir = req.job_dir / f"a{req.attempt}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**(os.environ if self.base_env is None else self.base_env), "PYTHONUNBUFFERED": "1", **req.spec.env,
               "ORCHD_JOB_ID": str(req.job_id), "ORCHD_ATTEMPT": str(req.attempt),
               "ORCHD_JOB_DIR": str(req.job_dir), "ORCHD_RUN_NAME": req.run_name,
               "ORCHD_ATTEMPT_DIR": str(run_dir)}
        # `python` in a command means the interpreter orchd runs on (its venv), not whatever is first on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = [sys.executable, "-m", "orchestrator.backends.local_runner", str(run_dir), req.spec.workdir,
               str(req.spec.resources.time_limit or 0), req.spec.command]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            int(proc.stdout.strip())
        except (subprocess.SubprocessError, ValueError, OSError) as e:
            detail = getattr(locals().get("proc"), "stderr", "") or str(e)
            raise BackendError(f"local: could not start the runner for {req.run_name}: {detail.strip()[-500:]}") \
                from None
        deadline = time.time() + 10
        while not (run_dir / "runner.json").exists():
            if (run_dir / "result.json").exists() or time.time() > deadline:
                break
            time.sleep(0.02)
        return str(run_dir)

    def _alive(self, run_dir: Path | str) -> bool:
        """Whether the runner named in runner.json lives (its pid, with its start time, so a reused
        pid does not count). runner.json is written once, by the runner: kept after the first read.
        A runner verified once is watched through its pidfd (pidwatch): alive until the last
        ``self._watch.refresh()`` saw it exit, which the caller runs first."""
        key = str(run_dir)
        if self._watch.watching(key):
            return True
        runner = self._runners.get(key)
        if runner is None:
            info = _read_json(os.path.join(key, "runner.json"))
            if info is None:
                return False
            runner = self._runners[key] = (info["runner_pid"], info.get("runner_start"))
        pid, start = runner

        def is_runner(p: int) -> bool:
            now = proc_start_time(p)
            return now is not None and now == start

        watched = self._watch.watch(key, pid, is_runner)
        alive = is_runner(pid) if watched is None else watched
        if not alive:
            self._runners.pop(key, None)
        return alive

    def _starting(self, run_dir: Path) -> bool:
        """Claimed by a runner that has not written runner.json yet (it forks, then starts the command)."""
        try:
            claimed = (run_dir / STARTED).stat().st_mtime
        except OSError:
            return False
        return not (run_dir / "runner.json").exists() and time.time() - claimed < STARTING_SECONDS

    def poll(self, ids: list[str], leased: Mapping[str, str] = NO_LEASES) -> dict[str, Observation]:
        """RUNNING while the runner lives; its result.json once it ended. A runner gone without a
        result is reported lost (FAILED, BACKEND_LOST) only once none of the attempt's processes
        is left (they are killed); until then, no news."""
        out: dict[str, Observation] = {}
        self._watch.refresh()
        for backend_id in ids:
            if self._watch.watching(backend_id):  # its runner lives (it writes result.json just before it exits)
                out[backend_id] = RUNNING
                continue
            result_path = os.path.join(backend_id, "result.json")  # strings, not Paths: 10^4 attempts a tick
            result = _read_json(result_path)
            if result is None and (self._alive(backend_id) or self._starting(Path(backend_id))):
                out[backend_id] = RUNNING
                continue
            result = result or _read_json(result_path)  # it may have just finished
            self._runners.pop(backend_id, None)  # ended or lost: a daemon lives for months
            self._watch.forget(backend_id)
            if result is not None:
                out[backend_id] = Observation(JobState(result["state"]), result.get("exit_code"),
                                              result.get("error", ""), result.get("ended_at"))
            elif kill_attempt(Path(backend_id)):
                out[backend_id] = Observation(JobState.FAILED, None, "BACKEND_LOST: the runner process is gone "
                                              "without a result (machine restart or killed); what it left "
                                              "running was stopped", time.time())
        return out

    def read_log(self, backend_id: str, offset: int, max_bytes: int) -> bytes:
        """Bytes of ``output.log`` from ``offset`` (see shell.read_regular_file: regular files
        only, LogShrunk when shorter than ``offset``)."""
        return read_regular_file(os.path.join(backend_id, "output.log"), offset, max_bytes)

    def cancel(self, backend_id: str) -> None:
        """Stop the attempt: SIGTERM to its runner (which stops the process group, SIGKILL after
        GRACE seconds, and records CANCELLED); if the runner is gone, SIGKILL to whatever of the
        attempt still runs. Idempotent. Raises BackendError if processes survive."""
        run_dir = Path(backend_id)
        if (run_dir / "result.json").exists():
            return
        info = _read_json(run_dir / "runner.json")
        self._watch.refresh()
        if info is not None and self._alive(backend_id):
            if self._watch.watching(backend_id):
                self._watch.send(backend_id, signal.SIGTERM)  # through the pidfd: never a recycled pid
            else:
                os.kill(info["runner_pid"], signal.SIGTERM)
            deadline = time.time() + GRACE + 5
            while not (run_dir / "result.json").exists() and time.time() < deadline:
                time.sleep(0.05)
            # its result is written: the next poll reads it, even if the runner has not exited yet
            self._watch.forget(backend_id)
        if not kill_attempt(run_dir):
            raise BackendError(f"local: processes of {run_dir} survive SIGKILL")
