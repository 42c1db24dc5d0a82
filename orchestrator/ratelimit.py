"""A rate limit shared by every orchd process on this machine: calls to one API endpoint spaced
at least ``interval`` seconds apart, whichever process or thread makes them.

The state is one number in a file, the earliest time (epoch s) the next call may go, updated
under ``flock``: a caller reserves the next free slot and sleeps until it, so callers queue in
order instead of polling, and a daemon, a cron ``orchd poll`` and ``orchd submit`` beside them
draw from one budget. A 429 pushes that time later for everyone (``penalize``). This is a
token bucket of depth one (GCRA), the model Vast.ai documents for its API: a minimum interval
per endpoint (its 429 answers name it, "API requests too frequent endpoint threshold=2.0").
Processes on other machines sharing a PostgreSQL database do not share it.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path


class RateLimiter:
    """Calls spaced ``interval`` seconds apart across processes sharing ``path``.

    Raises OSError only if ``path``'s directory cannot be written."""

    def __init__(self, path: Path, interval: float):
        self.path, self.interval = path, interval
        path.parent.mkdir(parents=True, exist_ok=True)

    def _update(self, change) -> float:  # change(next_at, now) -> (new next_at, value to return)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 64, 0).decode(errors="replace").strip()
            try:
                next_at = float(raw)
            except ValueError:
                next_at = 0.0  # a new (or damaged) file: no call is owed
            now = time.time()
            next_at = min(next_at, now + 3600)  # a clock set back must not stall calls for long
            new, out = change(next_at, now)
            data = repr(new).encode()
            os.pwrite(fd, data.ljust(64), 0)
            return out
        finally:
            os.close(fd)  # releases the flock

    def wait(self, cancelled: threading.Event | None = None) -> float:
        """Reserve the next slot and sleep until it; returns the seconds waited. Returns early
        (the slot is still spent) if ``cancelled`` is set meanwhile."""

        def reserve(next_at: float, now: float) -> tuple[float, float]:
            slot = max(next_at, now)
            return slot + self.interval, slot - now

        delay = self._update(reserve)
        if delay > 0:
            if cancelled is not None:
                cancelled.wait(delay)
            else:
                time.sleep(delay)
        return delay

    def penalize(self, seconds: float) -> None:
        """The provider answered 429: no call before ``seconds`` from now, in any process."""
        self._update(lambda next_at, now: (max(next_at, now + seconds), 0.0))
