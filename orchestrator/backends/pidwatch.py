"""Which local runners still live, for 10,000 of them at the cost of one system call.

A pidfd (pidfd_open(2), Linux >= 5.3) refers to one process and never to a later one given the
same pid, and becomes readable once that process has exited (a zombie included). The local
backend verifies a runner once — its pid's /proc start time against the one in runner.json,
*after* opening the pidfd, so the descriptor is known to name that runner — and then keeps the
pidfd in an epoll set: one ``epoll_wait`` per poll lists the runners that ended, where reading
every runner's ``/proc/PID/stat`` cost ~9 us each (0.1 s of a 10,000-job tick). Signals go
through the pidfd too (pidfd_send_signal(2)), so a cancel never reaches a recycled pid.

Descriptors are a budget: at most half the soft RLIMIT_NOFILE are held (a daemon that watches
10,000 runners needs ``LimitNOFILE=`` / ``ulimit -n`` above 20,000). Beyond that, or where
pidfds are missing, ``watch`` returns None and the caller reads /proc as before.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable


def _fd_budget() -> int:
    """How many pidfds may be held: half the soft limit on open files (getrlimit(2)); 0 where it
    cannot be read. The limit is not raised: the processes orchd starts would inherit it, and
    some programs close every descriptor up to it."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return max(0, (1 << 20 if soft == resource.RLIM_INFINITY else soft) // 2)
    except (ImportError, OSError, ValueError):
        return 0


class PidWatch:
    """Live processes by key (a run directory), each held as a pidfd in one epoll set.

    ``watch(key, pid, verify)``: start watching ``pid`` if ``verify(pid)`` (called after the
    pidfd is open) says it is the expected process. ``refresh()``: forget every watched process
    that has exited since. ``watching(key)``: watched and alive at the last refresh.
    ``send(key, sig)``: signal it through its pidfd. Not thread-safe (one tick at a time)."""

    def __init__(self, budget: int | None = None):
        self._available = hasattr(os, "pidfd_open") and hasattr(select, "epoll")
        self._budget = budget
        self._epoll: select.epoll | None = None
        self._fds: dict[str, int] = {}   # key -> pidfd
        self._keys: dict[int, str] = {}  # pidfd -> key

    def watching(self, key: str) -> bool:
        return key in self._fds

    def __len__(self) -> int:
        return len(self._fds)

    def watch(self, key: str, pid: int, verify: Callable[[int], bool]) -> bool | None:
        """True: ``pid`` lives, is the expected process, and is watched from now on. False: it
        is gone or ``verify`` rejects it (a recycled pid). None: it cannot be watched (no
        pidfds here, or the descriptor budget is spent); the caller checks /proc itself."""
        self.forget(key)
        if not self._available:
            return None
        if self._budget is None:
            self._budget = _fd_budget()
        if len(self._fds) >= self._budget:
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError:  # EMFILE, ENOSYS (an old kernel), a seccomp filter: /proc it is
            return None
        try:
            if not verify(pid):  # checked after opening: the pidfd names the process verified
                os.close(fd)
                return False
            if self._epoll is None:
                self._epoll = select.epoll()
            self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            os.close(fd)
            raise
        self._fds[key], self._keys[fd] = fd, key
        return True

    def refresh(self) -> None:
        """Forget the watched processes that have exited (their pidfds are readable)."""
        if self._epoll is None or not self._fds:
            return
        for fd, _ in self._epoll.poll(0, len(self._fds)):
            key = self._keys.get(fd)
            if key is not None:
                self.forget(key)

    def send(self, key: str, sig: int) -> bool:
        """Send ``sig`` to the watched process ``key``; False if it is not watched or has gone."""
        fd = self._fds.get(key)
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            self.forget(key)
            return False
        return True

    def forget(self, key: str) -> None:
        """Stop watching ``key`` and close its pidfd (nothing if it is not watched)."""
        fd = self._fds.pop(key, None)
        if fd is None:
            return
        del self._keys[fd]
        if self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
        os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self.forget(key)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
