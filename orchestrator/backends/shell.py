"""Run commands and touch files on a host: this machine (subprocess) or a login node over SSH
(``remote.RemoteHost``).

The SLURM backend talks to the cluster only through this, so its local and SSH modes are one
code path. SSH uses key authentication and checks the host key against ``known_hosts``: an
unknown or changed key is an error, never silently accepted.
"""

from __future__ import annotations

import io
import os
import shlex
import stat
import subprocess
from pathlib import Path

from orchestrator.backends.base import LogShrunk, LogUnreadable
from orchestrator.backends.remote import COMMAND_TIMEOUT, RemoteHost
from orchestrator.errors import BackendError


def read_regular_file(path: str | Path, offset: int, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the local file ``path`` from ``offset``; b"" if it does not exist.
    Only a regular file is read: it is opened non-blocking and checked with ``fstat``, so a FIFO
    or a directory in a log's place raises BackendError instead of blocking or crashing. Raises
    LogShrunk when the file is shorter than ``offset`` (truncated or rotated), LogUnreadable when
    it cannot be read at all."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise LogUnreadable(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LogUnreadable(f"{path} is not a regular file; orchd reads only regular files")
        if st.st_size < offset:
            raise LogShrunk(st.st_size)
        # no more than the file holds: pread allocates what it is asked for, and a 2 MiB buffer
        # (mmap'd, then shrunk) cost 15 us of the 24 us a tick spent on a log with 1 KB of news
        want = min(max_bytes, st.st_size - offset)
        return os.pread(fd, want, offset) if want > 0 else b""
    except OSError as e:
        raise LogUnreadable(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


class Shell:
    """Where commands run. ``run`` returns (exit status, stdout, stderr)."""

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        raise NotImplementedError

    def read(self, path: str, offset: int, max_bytes: int) -> bytes:
        """Bytes of ``path`` from ``offset`` (b"" if the file does not exist yet). Raises
        LogShrunk when the file is shorter than ``offset``, BackendError when it cannot be read."""
        raise NotImplementedError

    def write(self, path: str, data: bytes) -> None:
        """Create or replace ``path``, making its directory."""
        raise NotImplementedError


class LocalShell(Shell):
    """This machine. ``base_env``: the environment commands (and so ``sbatch``'s jobs, which
    inherit it) start from; default orchd's own (config.job_environ gives one without secrets)."""

    def __init__(self, base_env: dict[str, str] | None = None):
        self.base_env = base_env

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        base = os.environ if self.base_env is None else self.base_env
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                               env={**base, **(env or {})})
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BackendError(f"{argv[0]}: {e}") from None
        return p.returncode, p.stdout, p.stderr

    def read(self, path: str, offset: int, max_bytes: int) -> bytes:
        return read_regular_file(path, offset, max_bytes)

    def write(self, path: str, data: bytes) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)


class SSHShell(Shell):
    """A login node over SSH (``remote.RemoteHost``: one connection, reopened when it drops; an
    unknown or changed host key is refused)."""

    def __init__(self, host: str, port: int = 22, user: str | None = None, key_file: str | None = None,
                 known_hosts: str | None = None):
        self.host = host
        known = Path(os.path.expanduser(known_hosts or "~/.ssh/known_hosts"))
        self.remote = RemoteHost(host, port, user, key_file, known, connect_tries=3)

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        return self.remote.exec(prefix + shlex.join(argv), timeout=COMMAND_TIMEOUT)

    def read(self, path: str, offset: int, max_bytes: int) -> bytes:
        return self.remote.read(path, offset, max_bytes)

    def write(self, path: str, data: bytes) -> None:
        code, _, err = self.run(["mkdir", "-p", os.path.dirname(path)])
        if code:
            raise BackendError(f"ssh {self.host}: mkdir for {path}: {err.strip()}")
        self.remote.put(io.BytesIO(data), path, len(data))
