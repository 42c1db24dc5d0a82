"""The one SSH wrapper (orchestrator/backends/remote.py) against the loopback OpenSSH server that
scripts/start-local-sshd.sh starts (port 2222): host keys refused, recorded or found changed,
reads from an offset, a shrunk file, a dropped connection."""

from __future__ import annotations

import io
import os
import socket
import subprocess
from pathlib import Path

import pytest

from orchestrator.backends.base import LogShrunk
from orchestrator.backends.remote import HostKeyChanged, RemoteHost
from orchestrator.errors import BackendError

SSH_DIR = Path(os.environ.get("SLURMLAB_DIR", "/tmp/orchd-slurm")) / "ssh"
KEY = SSH_DIR / "client_ed25519"


@pytest.fixture(autouse=True)
def sshd():
    try:
        socket.create_connection(("127.0.0.1", 2222), timeout=2).close()
    except OSError:
        pytest.skip("no loopback sshd on 2222 (scripts/start-local-sshd.sh starts one)")
    if not KEY.exists():
        pytest.skip(f"no client key {KEY}")


def host(known: Path, tofu: bool = False) -> RemoteHost:
    return RemoteHost("127.0.0.1", 2222, "root", str(KEY), known, trust_first_use=tofu, connect_timeout=5)


def test_unknown_host_is_refused_unless_trusted_on_first_use(tmp_path: Path):
    with pytest.raises(BackendError, match="not found"):
        host(tmp_path / "none").exec("true")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(BackendError, match="add it to"):
        host(empty).exec("true")
    known = tmp_path / "known"
    assert host(known, tofu=True).exec("echo hi") == (0, "hi\n", "")
    assert known.stat().st_mode & 0o777 == 0o600 and "ssh-" in known.read_text()
    assert host(known).exec("echo again")[1] == "again\n"  # recorded: now checked strictly


def test_a_changed_host_key_is_refused_before_anything_is_sent(tmp_path: Path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, b64 = (tmp_path / "other.pub").read_text().split()[:2]
    known = tmp_path / "known"
    known.write_text(f"[127.0.0.1]:2222 {kind} {b64}\n")
    marker = tmp_path / "ran"
    with pytest.raises(HostKeyChanged, match="host key CHANGED"):
        host(known, tofu=True).exec(f"touch {marker}")
    assert not marker.exists()


def test_reads_from_an_offset_notice_a_shrunk_file_and_survive_a_drop(tmp_path: Path):
    h = host(tmp_path / "known", tofu=True)
    log = tmp_path / "remote.log"
    h.put(io.BytesIO(b"0123456789"), str(log), 10)
    assert h.read(str(log), 4, 3) == b"456"
    assert h.read(str(log), 10, 100) == b""
    assert h.read(str(tmp_path / "absent"), 0, 10) == b""
    assert h.size(str(log)) == 10 and h.size(str(tmp_path / "absent")) is None
    log.write_bytes(b"01")  # truncated under the reader
    with pytest.raises(LogShrunk) as e:
        h.read(str(log), 10, 100)
    assert e.value.size == 2
    h.connect().close()  # the connection drops: the next call reconnects
    assert h.exec("echo back")[1] == "back\n"
