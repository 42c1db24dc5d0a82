"""Backend ``local``: attempts run as processes on this machine, detached from orchd.

Each attempt gets ``<jobs_dir>/<job>/a<n>/`` holding ``output.log``, ``runner.json`` and, when
it ends, ``result.json`` written by ``local_runner`` (so the exit code is known even if no orchd
process was alive at the time). The backend id is that directory. ``time_limit`` is enforced by
the runner (TIMEOUT); cancel signals the runner, which stops the whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.backends.base import Backend, Observation, SubmitRequest
from orchestrator.backends.local_runner import GRACE, proc_start_time
from orchestrator.errors import BackendError
from orchestrator.spec import JobSpec
from orchestrator.states import JobState


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LocalBackend(Backend):
    """Runs attempts under ``jobs_dir``; an hour costs ``usd_per_hour`` (config ``local:``, default 0)."""

    name = "local"

    def __init__(self, jobs_dir: Path, usd_per_hour: float = 0.0):
        self.jobs_dir = jobs_dir
        self.rate = usd_per_hour

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        return self.rate or None

    def submit(self, req: SubmitRequest) -> str:
        run_dir = req.job_dir / f"a{req.attempt}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **req.spec.env,
               "ORCHD_JOB_ID": str(req.job_id), "ORCHD_ATTEMPT": str(req.attempt),
               "ORCHD_JOB_DIR": str(req.job_dir), "ORCHD_RUN_NAME": req.run_name}
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

    def _alive(self, run_dir: Path) -> bool:
        info = _read_json(run_dir / "runner.json")
        if info is None:
            return False
        start = proc_start_time(info["runner_pid"])
        return start is not None and start == info.get("runner_start")

    def poll(self, ids: list[str]) -> dict[str, Observation]:
        out: dict[str, Observation] = {}
        for backend_id in ids:
            run_dir = Path(backend_id)
            result = _read_json(run_dir / "result.json")
            if result is None and self._alive(run_dir):
                out[backend_id] = Observation(JobState.RUNNING)
                continue
            result = result or _read_json(run_dir / "result.json")  # it may have just finished
            if result is None:
                out[backend_id] = Observation(JobState.FAILED, None, "BACKEND_LOST: the runner process is gone "
                                              "without a result (machine restart or killed)", time.time())
            else:
                out[backend_id] = Observation(JobState(result["state"]), result.get("exit_code"),
                                              result.get("error", ""), result.get("ended_at"))
        return out

    def read_log(self, backend_id: str, offset: int, max_bytes: int) -> bytes:
        try:
            with open(Path(backend_id) / "output.log", "rb") as f:
                f.seek(offset)
                return f.read(max_bytes)
        except FileNotFoundError:
            return b""

    def cancel(self, backend_id: str) -> None:
        run_dir = Path(backend_id)
        info = _read_json(run_dir / "runner.json")
        if info is None or (run_dir / "result.json").exists():
            return
        if self._alive(run_dir):
            os.kill(info["runner_pid"], signal.SIGTERM)
            deadline = time.time() + GRACE + 5
            while not (run_dir / "result.json").exists() and time.time() < deadline:
                time.sleep(0.05)
        else:  # the runner died (kill -9): stop its job ourselves
            try:
                os.killpg(info["pgid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
