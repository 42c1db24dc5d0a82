"""The rate limiter shared by orchd processes (orchestrator/ratelimit.py), across real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from orchestrator.ratelimit import RateLimiter

CALLER = """
import sys, time
from pathlib import Path
from orchestrator.ratelimit import RateLimiter
limiter = RateLimiter(Path(sys.argv[1]), float(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    limiter.wait()
    print(repr(time.time()), flush=True)
"""


def test_two_processes_share_one_pace(tmp_path: Path):
    """Two processes calling at once are spaced as one: no two calls closer than the interval."""
    path, interval = tmp_path / "limit", 0.15
    procs = [subprocess.Popen([sys.executable, "-c", CALLER, str(path), str(interval), "6"], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    times = sorted(float(line) for p in procs for line in p.communicate(timeout=60)[0].split())
    assert len(times) == 12 and all(p.returncode == 0 for p in procs)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= interval - 0.01, gaps  # sleep's wake-up may come a hair early, never a slot early
    assert times[-1] - times[0] < 11 * interval + 1.0  # queued, not polling: close to the ideal 11 intervals


def test_a_429_holds_back_every_caller(tmp_path: Path):
    path = tmp_path / "limit"
    a, b = RateLimiter(path, 0.05), RateLimiter(path, 0.05)
    a.wait()
    a.penalize(0.5)
    t0 = time.time()
    b.wait()  # another process's limiter on the same file
    assert time.time() - t0 >= 0.45


def test_a_damaged_state_file_is_a_fresh_start(tmp_path: Path):
    path = tmp_path / "limit"
    path.write_bytes(b"\xff garbage")
    t0 = time.time()
    RateLimiter(path, 10.0).wait()
    assert time.time() - t0 < 1.0
