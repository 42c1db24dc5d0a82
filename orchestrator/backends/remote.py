"""One SSH host, through paramiko: the only SSH code in orchd. The SLURM backend's login node
(``shell.SSHShell``) and every rented instance (``cloud.CloudBackend``) use it.

One connection (and one SFTP session on it), opened on first use and reopened after it drops;
every failure is a BackendError naming the host, never a paramiko traceback. Keys only (no
passwords, no agent unless no key file is given). Host keys are checked against a
``known_hosts`` file with paramiko's ``RejectPolicy``: an unknown host is refused, unless
``trust_first_use`` (a rented instance is new by definition: its key is recorded on first
contact, ``$ORCHD_HOME/known_hosts/<provider>-<id>``); a changed key raises HostKeyChanged and
nothing is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import paramiko

from orchestrator.backends.base import LogShrunk
from orchestrator.errors import BackendError

COMMAND_TIMEOUT = 60.0  # seconds for one remote command


class HostKeyChanged(BackendError):
    """The host's SSH key is not the one on record: the machine was replaced or re-created (a
    provider restarted the container), or someone is in between. Nothing was sent to it."""


class RemoteHost:
    """``user@host:port`` with ``key_file``; ``known_hosts`` is the file keys are checked against
    (and, with ``trust_first_use``, recorded in, mode 0600). ``connect_timeout`` in seconds."""

    def __init__(self, host: str, port: int, user: str | None, key_file: str | None, known_hosts: Path,
                 trust_first_use: bool = False, connect_timeout: float = 10.0, connect_tries: int = 1):
        self.host, self.port, self.user = host, port, user
        self.key_file = str(Path(key_file).expanduser()) if key_file else None
        self.known_hosts, self.trust_first_use = known_hosts, trust_first_use
        self.connect_timeout, self.connect_tries = connect_timeout, connect_tries
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def _open(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        first_use = not self.known_hosts.exists()
        if first_use and not self.trust_first_use:
            raise BackendError(f"ssh {self}: known_hosts file {self.known_hosts} not found")
        if not first_use:
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if first_use else paramiko.RejectPolicy())
        t = self.connect_timeout
        try:
            client.connect(self.host, port=self.port, username=self.user, key_filename=self.key_file, timeout=t,
                           banner_timeout=t, auth_timeout=t, allow_agent=self.key_file is None,
                           look_for_keys=self.key_file is None)
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyChanged(f"ssh {self}: host key CHANGED ({e}); refusing") from None
        except paramiko.SSHException as e:
            client.close()
            hint = f" (add it to {self.known_hosts})" if "not found in known_hosts" in str(e) else ""
            raise BackendError(f"ssh {self}: {e}{hint}") from None
        except OSError as e:
            client.close()
            raise BackendError(f"ssh {self}: {e}") from None
        if first_use:
            client.save_host_keys(str(self.known_hosts))
            self.known_hosts.chmod(0o600)
        return client

    def connect(self) -> paramiko.SSHClient:
        """The open connection, (re)opened if needed. Raises BackendError, HostKeyChanged."""
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                self._client, self._sftp = None, None
                for n in range(self.connect_tries):
                    try:
                        self._client = self._open()
                        break
                    except HostKeyChanged:
                        raise
                    except BackendError:
                        if n == self.connect_tries - 1:
                            raise
                        time.sleep(min(4.0, 0.5 * 2**n))  # a login node's sshd may be busy for a moment
            assert self._client is not None
            return self._client

    def sftp(self) -> paramiko.SFTPClient:
        client = self.connect()
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = client.open_sftp()
                except (OSError, paramiko.SSHException) as e:
                    self._drop()
                    raise BackendError(f"ssh {self}: sftp: {e}") from None
            return self._sftp

    def _drop(self) -> None:
        """Forget the connection (it failed): the next call reconnects."""
        client, self._client, self._sftp = self._client, None, None
        if client is not None:
            client.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def exec(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
        """Run ``command`` (a shell command line: quote what goes in) and return (exit status,
        stdout, stderr). Raises BackendError when the host cannot be reached or the command
        outlives ``timeout`` seconds."""
        try:
            _, out, err = self.connect().exec_command(command, timeout=timeout)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), stdout, stderr
        except (OSError, paramiko.SSHException) as e:
            self._drop()
            raise BackendError(f"ssh {self}: {command.split(None, 1)[0] if command else ''}: {e}") from None

    def read(self, path: str, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of ``path`` from ``offset``; b"" if it does not exist (yet). Raises
        LogShrunk when the file is shorter than ``offset`` (truncated or rotated; asked only when
        nothing new came, so no extra round trip per read), BackendError when it cannot be read."""
        try:
            with self.sftp().open(path, "rb") as f:
                f.seek(offset)
                data = f.read(max_bytes)
                if not data and offset and (size := f.stat().st_size or 0) < offset:
                    raise LogShrunk(size)
                return data
        except FileNotFoundError:
            return b""
        except (OSError, paramiko.SSHException) as e:
            self._drop()  # the offset is unchanged: the next call reconnects and goes on, nothing lost
            raise BackendError(f"ssh {self}: read {path}: {e}") from None

    def put(self, data: IO[bytes], path: str, size: int, progress: Callable[[int, int], None] | None = None) -> None:
        """Write the stream ``data`` (``size`` bytes) to ``path``. Raises BackendError."""
        try:
            self.sftp().putfo(data, path, file_size=size, callback=progress)
        except (OSError, paramiko.SSHException) as e:
            self._drop()
            raise BackendError(f"ssh {self}: write {path}: {type(e).__name__}: {e}") from None

    def size(self, path: str) -> int | None:
        """Bytes in ``path``, or None if it does not exist. Raises BackendError."""
        try:
            return self.sftp().stat(path).st_size or 0
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as e:
            self._drop()
            raise BackendError(f"ssh {self}: stat {path}: {e}") from None

    def get(self, path: str, local: Path, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy ``path`` to the local file ``local``. Raises BackendError."""
        try:
            self.sftp().get(path, str(local), callback=progress)
        except (OSError, paramiko.SSHException) as e:
            self._drop()
            raise BackendError(f"ssh {self}: copy {path}: {e}") from None
