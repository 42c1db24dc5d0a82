"""The local backend with real processes: detached runs, exit codes, time limit, cancel."""

import json
import os
import time
from pathlib import Path

from orchestrator.backends.base import SubmitRequest
from orchestrator.backends.local import LocalBackend
from orchestrator.spec import JobSpec
from orchestrator.states import JobState
from tests.conftest import group_alive, pid_alive, wait_for


def start(tmp: Path, command: str, attempt: int = 1, **resources) -> tuple[LocalBackend, str]:
    b = LocalBackend(tmp / "jobs")
    spec = JobSpec.model_validate({"name": "t", "command": command, "workdir": str(tmp),
                                   "resources": resources})
    return b, b.submit(SubmitRequest(1, attempt, spec, tmp / "jobs" / "1"))


def ended(b: LocalBackend, bid: str):
    ob = b.poll([bid])[bid]
    return ob if ob.state.terminal else None


def test_exit_code_recorded_without_orchd(tmp_path):
    b, bid = start(tmp_path, "echo out; echo err >&2; echo job=$ORCHD_JOB_ID attempt=$ORCHD_ATTEMPT; exit 3")
    # nothing of orchd waits on the process: the runner alone records the result
    ob = wait_for(lambda: ended(b, bid), 10, what="end")
    assert (ob.state, ob.exit_code) == (JobState.FAILED, 3)
    assert b.read_log(bid, 0, 1000) == b"out\nerr\njob=1 attempt=1\n"
    assert b.read_log(bid, 4, 3) == b"err"


def test_killed_by_signal_is_128_plus_n(tmp_path):
    b, bid = start(tmp_path, "kill -9 $$")
    ob = wait_for(lambda: ended(b, bid), 10, what="end")
    assert (ob.state, ob.exit_code) == (JobState.FAILED, 137)


def test_time_limit_gives_timeout(tmp_path):
    b, bid = start(tmp_path, "sleep 30", time_limit="1s")
    t0 = time.time()
    ob = wait_for(lambda: ended(b, bid), 15, what="timeout")
    assert ob.state == JobState.TIMEOUT and time.time() - t0 < 8


def test_cancel_kills_the_whole_process_group(tmp_path):
    b, bid = start(tmp_path, "sleep 300 & echo $! > child.pid; sleep 300")
    pid = int(wait_for(lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text(), 10))
    assert b.poll([bid])[bid].state == JobState.RUNNING
    b.cancel(bid)
    assert b.poll([bid])[bid].state == JobState.CANCELLED
    wait_for(lambda: not pid_alive(pid), 5, what="background child to die")
    b.cancel(bid)  # idempotent


def test_runner_gone_without_result_is_reported(tmp_path):
    b, bid = start(tmp_path, "sleep 300")
    info = json.loads((Path(bid) / "runner.json").read_text())
    os.kill(info["runner_pid"], 9)
    ob = wait_for(lambda: ended(b, bid), 10, what="lost runner noticed")
    assert ob.state == JobState.FAILED and "BACKEND_LOST" in ob.reason
    b.cancel(bid)  # still stops the job's own process group
    wait_for(lambda: not group_alive(info["pgid"]), 5, what="orphaned group killed")
