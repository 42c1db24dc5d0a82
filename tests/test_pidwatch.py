"""pidwatch with real processes: exits (zombies too) are seen, recycled pids are refused, and
the local backend gives the same answers with and without pidfds."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.backends.local import LocalBackend
from orchestrator.backends.local_runner import proc_start_time
from orchestrator.backends.pidwatch import PidWatch
from orchestrator.states import JobState
from tests.conftest import wait_for
from tests.test_local_backend import ended, start

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd_open here")


def test_exit_is_seen_even_as_an_unreaped_zombie():
    child = subprocess.Popen(["sleep", "300"])  # our child: not reaped until wait() -> a zombie
    w = PidWatch()
    try:
        assert w.watch("a", child.pid, lambda pid: True) is True
        w.refresh()
        assert w.watching("a")
        child.kill()
        wait_for(lambda: (w.refresh(), not w.watching("a"))[1], 5, what="exit seen")
        assert proc_start_time(child.pid) is None  # (a zombie now: /proc says so too)
        assert len(w) == 0
    finally:
        child.kill()
        child.wait()
        w.close()


def test_a_process_the_verifier_rejects_is_not_watched():
    child = subprocess.Popen(["sleep", "300"])
    w = PidWatch()
    try:
        # what a recycled pid looks like: alive, but not with the start time runner.json recorded
        assert w.watch("a", child.pid, lambda pid: proc_start_time(pid) == "0") is False
        assert not w.watching("a") and len(w) == 0
        child.kill()
        child.wait()
        assert w.watch("a", child.pid, lambda pid: True) is False  # gone and reaped
    finally:
        child.kill()
        w.close()


def test_beyond_its_descriptor_budget_it_declines_and_frees_what_it_forgets():
    kids = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    w = PidWatch(budget=2)
    try:
        assert [w.watch(str(i), k.pid, lambda pid: True) for i, k in enumerate(kids)] == [True, True, None]
        w.forget("0")
        assert w.watch("2", kids[2].pid, lambda pid: True) is True
        assert w.send("2", 15) and wait_for(lambda: kids[2].poll() is not None, 5)
    finally:
        for k in kids:
            k.kill()
            k.wait()
        w.close()


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfds", "proc"])
def test_local_backend_answers_the_same_with_or_without_pidfds(tmp_path, pidfds):
    b, bid = start(tmp_path, "sleep 300")
    if not pidfds:
        b._watch = PidWatch(budget=0)
    assert b.poll([bid])[bid].state == JobState.RUNNING
    assert len(b._watch) == (1 if pidfds else 0)
    assert b.poll([bid])[bid].state == JobState.RUNNING
    runner = json.loads((Path(bid) / "runner.json").read_text())["runner_pid"]
    os.kill(runner, 9)
    ob = wait_for(lambda: ended(b, bid), 10, what="lost runner noticed")
    assert ob.state == JobState.FAILED and "BACKEND_LOST" in ob.reason
    assert len(b._watch) == 0  # its pidfd is closed


def test_runner_json_of_a_recycled_pid_is_not_alive(tmp_path):
    """runner.json names a live process that is not the runner (its start time differs): lost, not RUNNING."""
    b, bid = start(tmp_path, "sleep 300")
    info = json.loads((Path(bid) / "runner.json").read_text())
    os.kill(info["runner_pid"], 9)
    # start times count clock ticks (10 ms): a stranger started in the runner's own tick would pass
    # for it (a real pid cannot come round again that fast: the pid space would have to wrap)
    time.sleep(0.05)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        assert proc_start_time(other.pid) != info["runner_start"]
        (Path(bid) / "runner.json").write_text(json.dumps({**info, "runner_pid": other.pid}))
        fresh = LocalBackend(tmp_path / "jobs")
        ob = wait_for(lambda: ended(fresh, bid), 10, what="lost runner noticed")
        assert ob.state == JobState.FAILED and len(fresh._watch) == 0
        assert other.poll() is None  # the stranger was neither watched nor signalled
    finally:
        other.kill()
        other.wait()
