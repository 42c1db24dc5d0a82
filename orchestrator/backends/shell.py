"""Run commands and touch files on a host: this machine (subprocess) or a login node (paramiko).

The SLURM backend talks to the cluster only through this, so its local and SSH modes are one
code path. SSH uses key authentication and checks the host key against ``known_hosts``
(paramiko ``RejectPolicy``): an unknown or changed key is an error, never silently accepted.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import threading
from pathlib import Path

import paramiko
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from orchestrator.backends.base import LogShrunk, LogUnreadable
from orchestrator.errors import BackendError

COMMAND_TIMEOUT = 60.0  # seconds for one sbatch/sacct/scancel


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
        return os.pread(fd, max_bytes, offset)
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
    """A login node over SSH; one connection, reopened when it drops."""

    def __init__(self, host: str, port: int = 22, user: str | None = None, key_file: str | None = None,
                 known_hosts: str | None = None):
        self.host, self.port, self.user = host, port, user
        self.key_file = os.path.expanduser(key_file) if key_file else None
        self.known_hosts = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    @retry(retry=retry_if_exception_type((OSError, paramiko.SSHException)), stop=stop_after_attempt(3),
           wait=wait_exponential(multiplier=0.5, max=4), reraise=True)
    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(self.known_hosts)
        except FileNotFoundError:
            raise BackendError(f"ssh {self.host}: known_hosts file {self.known_hosts} not found") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(self.host, port=self.port, username=self.user, key_filename=self.key_file, timeout=10,
                       banner_timeout=10, auth_timeout=10, allow_agent=False, look_for_keys=self.key_file is None)
        return client

    def _conn(self) -> paramiko.SSHClient:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                try:
                    self._client = self._connect()
                except paramiko.BadHostKeyException as e:
                    raise BackendError(f"ssh {self.host}:{self.port}: host key CHANGED ({e}); refusing") from None
                except paramiko.SSHException as e:  # RejectPolicy: unknown host
                    raise BackendError(f"ssh {self.host}:{self.port}: {e} (add it to {self.known_hosts})") from None
                except OSError as e:
                    raise BackendError(f"ssh {self.host}:{self.port}: {e}") from None
                self._sftp = None
            return self._client

    def _sftp_client(self) -> paramiko.SFTPClient:
        client = self._conn()
        if self._sftp is None:
            self._sftp = client.open_sftp()
        return self._sftp

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        try:
            _, out, err = self._conn().exec_command(prefix + shlex.join(argv), timeout=COMMAND_TIMEOUT)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), stdout, stderr
        except (OSError, paramiko.SSHException) as e:
            self._client = None
            raise BackendError(f"ssh {self.host}: {' '.join(argv[:2])}: {e}") from None

    def read(self, path: str, offset: int, max_bytes: int) -> bytes:
        try:
            with self._sftp_client().open(path, "rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
                if not data and offset and (size := f.stat().st_size or 0) < offset:
                    raise LogShrunk(size)  # asked only when nothing is new: no extra round trip per read
                return data
        except FileNotFoundError:
            return b""
        except (OSError, paramiko.SSHException) as e:
            self._client = None  # reconnect next time; the offset is unchanged, nothing is lost
            raise BackendError(f"ssh {self.host}: read {path}: {e}") from None

    def write(self, path: str, data: bytes) -> None:
        code, _, err = self.run(["mkdir", "-p", os.path.dirname(path)])
        if code:
            raise BackendError(f"ssh {self.host}: mkdir for {path}: {err.strip()}")
        try:
            with self._sftp_client().open(path, "wb") as f:
                f.write(data)
        except (OSError, paramiko.SSHException) as e:
            raise BackendError(f"ssh {self.host}: write {path}: {e}") from None
