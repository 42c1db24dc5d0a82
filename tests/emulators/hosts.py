"""What the provider emulators share: real "instances" and injected faults.

An instance is an OpenSSH server on its own loopback port with its own host key and ``$HOME``
(``<root>/instance-<id>/home``), standing in for a fresh container; every session gets
``ORCHD_EMU_INSTANCE=<pool>-<id>`` (sshd_config ``SetEnv``; the pool's random prefix keeps two
emulators that number instances alike, say two test runs at once, from killing each other's)
and the ``PATH`` given (the "image").
Destroying it kills that sshd, its sessions and every process carrying the tag. Billing is
per second at the instance's $/hr from creation to destruction; a destroyed instance is still
listed for ``linger`` seconds (providers delete eventually). ``restart`` is a provider-side
container restart: every process of the instance dies, files stay, sshd comes back on the same
port (with new host keys if asked, as a re-created container has).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PORTS_TAKEN: set[int] = set()
_PORTS_LOCK = threading.Lock()


def _free_port() -> int:
    """A port for an instance's sshd: below Linux's ephemeral range (32768+), so no outgoing
    connection can take it before sshd binds it, and never handed out twice in this process
    (two concurrent creates once got the same port: one pod's sshd answered for the other)."""
    rng = random.Random()
    with _PORTS_LOCK:
        while True:
            port = rng.randint(20000, 32000)
            if port in _PORTS_TAKEN:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _PORTS_TAKEN.add(port)
            return port


def tagged(tag: str) -> list[int]:
    """PIDs of the processes whose environment holds ``tag`` (``NAME=value``)."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if tag.encode() in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                    pids.append(int(p))
            except OSError:
                continue
    return pids


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit() and _ppid(int(p)) == pid:
            out += [int(p), *_children(int(p))]
    return out


@dataclass
class Host:
    id: str
    label: str
    usd_per_hour: float
    created: float
    dir: Path
    port: int
    sshd: subprocess.Popen | None = None
    destroyed: float | None = None
    meta: dict = field(default_factory=dict)  # the emulator's own record (offer, GPU type, ...)


@dataclass
class HostPool:
    """The instances of one emulator. ``never_ssh``: instances never start their sshd;
    ``undying``: ids or labels the API refuses to destroy (``stop()`` still does)."""

    root: Path
    authorized_keys: Path
    path: str = "/usr/local/bin:/usr/bin:/bin"
    never_ssh: bool = False
    undying: set[str] = field(default_factory=set)  # ids/labels whose destroy the API refuses (an outage)
    refused: int = 0  # destroys refused so far
    linger: float = 0.0  # seconds a destroyed instance is still listed
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:8]

    def tag(self, iid: str) -> str:
        return f"{self.prefix}-{iid}"

    def start(self, iid: str, label: str, usd_per_hour: float, public_key: str | None = None, ssh: bool = True,
              **meta) -> Host:
        """A new instance. ``public_key`` (RunPod's ``PUBLIC_KEY`` env) replaces the account's keys;
        ``ssh`` False: its image starts no sshd (nothing answers on its port)."""
        d = self.root / f"instance-{iid}"
        (d / "home").mkdir(parents=True)
        host = Host(iid, label, usd_per_hour, time.time(), d, _free_port(), meta=meta)
        self.hosts[iid] = host
        if self.never_ssh or not ssh:
            return host
        keys = self.authorized_keys
        if public_key:
            keys = d / "authorized_keys"
            keys.write_text(public_key + "\n")
        host.meta["authorized_keys"] = keys
        self._sshd(host, new_key=True)
        return host

    def _sshd(self, host: Host, new_key: bool) -> None:
        d = host.dir
        if new_key:
            (d / "host_key").unlink(missing_ok=True)
            (d / "host_key.pub").unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        keys = host.meta["authorized_keys"]
        (d / "sshd_config").write_text(f"""Port {host.port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {keys}
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
SetEnv ORCHD_EMU_INSTANCE={self.tag(host.id)} HOME={d / 'home'} PATH={self.path}
MaxSessions 50
""")
        host.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "a"))

    def _kill_all(self, host: Host) -> None:
        victims = tagged(f"ORCHD_EMU_INSTANCE={self.tag(host.id)}")
        if host.sshd:
            victims += [host.sshd.pid, *_children(host.sshd.pid)]
        # all at once, as a container's end is: frozen first, so no survivor runs on for a moment
        # (a shell outliving its child would write the child's exit status)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in set(victims):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if host.sshd:
            host.sshd.wait()

    def restart(self, host: Host, new_host_key: bool = False) -> None:
        """A provider-side container restart: every process dies, the files stay, sshd comes back
        (with new host keys if ``new_host_key``); billing goes on."""
        assert host.destroyed is None and host.sshd is not None
        self._kill_all(host)
        self._sshd(host, new_key=new_host_key)

    def refuses_destroy(self, host: Host) -> bool:
        refused = host.id in self.undying or host.label in self.undying
        self.refused += refused
        return refused

    def destroy(self, host: Host) -> None:
        if host.destroyed is not None:
            return
        host.destroyed = time.time()
        self._kill_all(host)

    def drop_connections(self, host: Host) -> int:
        """Kill the sshd processes serving ``host``'s open connections (a network drop); what
        runs detached on the instance goes on. Returns how many were killed."""
        assert host.sshd is not None
        mine = [p for p in _children(host.sshd.pid) if _ppid(p) == host.sshd.pid]
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(mine)

    def destroy_all(self) -> None:
        for host in list(self.hosts.values()):
            self.destroy(host)

    def alive(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.destroyed is None]

    def listed(self) -> list[Host]:
        """What the provider still lists: the live instances and those destroyed under ``linger`` s ago."""
        now = time.time()
        return [h for h in self.hosts.values() if h.destroyed is None or now - h.destroyed < self.linger]

    def billing(self) -> dict[str, dict]:
        """Per instance id: seconds billed, USD, whether it is destroyed, its label. Billing runs
        from ``meta["billed_from"]`` (default: the creation) to the destruction."""
        now = time.time()
        out = {}
        for h in self.hosts.values():
            seconds = max(0.0, (h.destroyed or now) - h.meta.get("billed_from", h.created))
            out[h.id] = {"seconds": seconds, "destroyed": h.destroyed is not None,
                         "usd": h.usd_per_hour * seconds / 3600, "label": h.label}
        return out


@dataclass
class Faults:
    """Injected API faults: ``fail_rate`` of calls answer one of ``statuses``; ``slow_rate`` of
    calls wait ``slow_seconds`` first."""

    fail_rate: float = 0.0
    statuses: tuple[int, ...] = (429, 503)
    slow_rate: float = 0.0
    slow_seconds: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.lock = threading.Lock()

    def status(self) -> int | None:
        """The HTTP status this call fails with, or None; sleeps first if this call is slow."""
        with self.lock:
            slow = self.slow_rate and self.rng.random() < self.slow_rate
            fail = self.fail_rate and self.rng.random() < self.fail_rate
            code = self.rng.choice(self.statuses)
        if slow:
            time.sleep(self.slow_seconds)
        return code if fail else None


def send_raw(handler: BaseHTTPRequestHandler, data: bytes, code: int = 200) -> None:
    """Answer ``data`` as it is: an injected malformed answer, outside any contract."""
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@dataclass
class ProviderEmulator:
    """An HTTP API on 127.0.0.1 (``url``) whose instances are ``pool``'s. Subclasses give
    ``_handler()``; ``faults`` apply to every call."""

    root: Path
    authorized_keys: Path
    path: str = "/usr/local/bin:/usr/bin:/bin"  # PATH inside the "image" (tests add their venv: torch)
    faults: Faults = field(default_factory=Faults)
    # seconds a call of this path waits before it is handled (a provider slow to answer), and the
    # paths called so far, in order, as they arrived
    stall: dict[str, float] = field(default_factory=dict)
    arrived: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool = HostPool(self.root, self.authorized_keys, self.path)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def arrive(self, path: str) -> None:
        """Called first by every request: records ``path``, then waits what ``stall`` says."""
        self.arrived.append(path)
        if seconds := self.stall.get(path):
            time.sleep(seconds)

    def start(self) -> ProviderEmulator:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.pool.destroy_all()
        self.server.shutdown()
        self.server.server_close()
