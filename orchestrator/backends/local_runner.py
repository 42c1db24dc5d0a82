"""The process that watches one local attempt, detached from orchd.

    python -m orchestrator.backends.local_runner RUN_DIR CWD TIME_LIMIT COMMAND

(``TIME_LIMIT`` in seconds, 0 for none; ``COMMAND`` one shell string.)

It first creates ``RUN_DIR/started`` exclusively (``O_EXCL``): a second runner for the same
attempt (an orchd that was killed before recording the start, then started it again) finds it,
prints 0 and starts nothing, so an attempt runs once. Then it forks; the parent prints the
child's pid and exits at once, so the watcher is adopted by init and outlives the CLI or
daemon that started it. The watcher starts its own session, runs
``sh -c COMMAND`` in a new process group with output appended to ``RUN_DIR/output.log``, and
writes ``RUN_DIR/runner.json`` (its pid, its /proc start time, the job's process group). When
the command ends it writes ``RUN_DIR/result.json`` atomically::

    {"state": "COMPLETED|FAILED|TIMEOUT|CANCELLED", "exit_code": 0, "ended_at": 1763771234.5}

``exit_code`` is the shell's: 128+N when killed by signal N. Past ``TIME_LIMIT`` seconds the
group gets SIGTERM, then SIGKILL after ``GRACE`` seconds (TIMEOUT, as SLURM's KillWait does);
SIGTERM to the watcher does the same and ends in CANCELLED.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE = 10.0  # seconds between SIGTERM and SIGKILL
STARTED = "started"  # created once, exclusively, by the first runner of an attempt


def proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None
    when the process does not exist or is a zombie. Guards against a recycled pid."""
    try:  # os.open, not pathlib: a tick asks this of every running local attempt
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            stat = os.read(fd, 4096).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def watch(run_dir: Path, cwd: str, command: str, time_limit: float | None) -> None:
    """Run ``command`` to its end and record the result (see module docstring)."""
    stop = {"cancelled": False}
    fd = os.open(run_dir / "output.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # the job's log: its user's
    with open(fd, "ab") as log:
        child = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, process_group=0)
    started = time.time()
    me = os.getpid()
    write_json_atomic(run_dir / "runner.json", {"runner_pid": me, "runner_start": proc_start_time(me),
                                                "pgid": child.pid, "started_at": started})

    def on_term(_sig: int, _frame: object) -> None:
        stop["cancelled"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    timed_out = False
    term_sent_at: float | None = None
    while child.poll() is None:
        now = time.time()
        if term_sent_at is None and (stop["cancelled"] or (time_limit and now - started > time_limit)):
            timed_out = not stop["cancelled"]
            _killpg(child.pid, signal.SIGTERM)
            term_sent_at = now
        elif term_sent_at is not None and now - term_sent_at > GRACE:
            _killpg(child.pid, signal.SIGKILL)
        try:
            child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    _killpg(child.pid, signal.SIGKILL)  # stragglers the command left in its group
    rc = child.returncode
    exit_code = rc if rc >= 0 else 128 - rc
    state = "CANCELLED" if stop["cancelled"] else "TIMEOUT" if timed_out else "COMPLETED" if rc == 0 else "FAILED"
    write_json_atomic(run_dir / "result.json", {"state": state, "exit_code": exit_code, "ended_at": time.time()})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("cwd")
    p.add_argument("time_limit", type=float, help="seconds, 0 for none")
    p.add_argument("command")
    args = p.parse_args(argv)
    try:
        os.close(os.open(args.run_dir / STARTED, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        print(0, flush=True)  # started already: this attempt runs once
        return
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        watch(args.run_dir, args.cwd, args.command, args.time_limit or None)
    except BaseException as e:  # leave a trace rather than nothing at all
        write_json_atomic(args.run_dir / "result.json", {"state": "FAILED", "exit_code": None,
                                                          "ended_at": time.time(), "error": repr(e)})
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
