"""A local emulator of the Vast.ai HTTP API, for driving the real ``vastai`` SDK in tests.

It implements the endpoints the SDK calls (../shared/notes/providers.md): offer search
(``POST /api/v0/bundles/``), create (``PUT /api/v0/asks/<offer>/``), show one
(``GET /api/v0/instances/<id>/``), list (``GET /api/v1/instances/``, paged) and destroy
(``DELETE /api/v0/instances/<id>/``), with the response fields the SDK and orchd read.

Instances are real: each is an OpenSSH server on its own loopback port with its own host key,
which sets ``ORCHD_EMU_INSTANCE=<id>`` in every session (sshd_config ``SetEnv``); destroying
an instance kills that sshd, its sessions and every process carrying the tag. Billing is per
second at the offer's $/hr from creation to destruction (``billing()``).

Faults: ``fail_rate`` (that share of API calls answer 429/503), ``never_ssh`` (instances never
start their sshd), ``fail_after_alloc`` (a create answers 500 after allocating the instance,
its id in the error body). Each instance has its own ``$HOME`` (``<root>/instance-<id>/home``)
and the ``PATH`` given, standing in for the image's.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

API_KEY = "emu-key"
OFFERS = [
    {"id": 101, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.40, "gpu_ram": 24564, "reliability2": 0.99},
    {"id": 102, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.35, "gpu_ram": 24564, "reliability2": 0.97},
    {"id": 103, "gpu_name": "A100 SXM4", "num_gpus": 1, "dph_total": 1.10, "gpu_ram": 81920, "reliability2": 0.995},
    {"id": 104, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_total": 0.20, "gpu_ram": 24576, "reliability2": 0.90},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged(tag: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if tag.encode() in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                    pids.append(int(p))
            except OSError:
                continue
    return pids


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out += [int(p), *_children(int(p))]
            except OSError:
                continue
    return out


@dataclass
class Instance:
    id: int
    offer: dict
    label: str
    created: float
    dir: Path
    port: int
    sshd: subprocess.Popen | None = None
    destroyed: float | None = None

    def row(self) -> dict:
        status = "running" if self.sshd else "loading"
        return {"id": self.id, "actual_status": status, "intended_status": "running", "cur_state": "running",
                "next_state": "running", "status_msg": "", "label": self.label, "gpu_name": self.offer["gpu_name"],
                "num_gpus": self.offer["num_gpus"], "dph_total": self.offer["dph_total"],
                "ssh_host": "127.0.0.1", "ssh_port": self.port, "public_ipaddr": "127.0.0.1",
                "ports": {"22/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(self.port)}]},
                "start_date": self.created, "extra_env": []}


@dataclass
class VastEmulator:
    root: Path
    authorized_keys: Path
    fail_rate: float = 0.0
    never_ssh: bool = False
    fail_after_alloc: bool = False
    seed: int = 0
    path: str = "/usr/local/bin:/usr/bin:/bin"  # PATH inside the "image" (tests add their venv: torch)
    instances: dict[int, Instance] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.lock = threading.Lock()
        self.next_id = 5000
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> VastEmulator:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for inst in list(self.instances.values()):
            self._destroy(inst)
        self.server.shutdown()
        self.server.server_close()

    def billing(self) -> dict[int, dict]:
        """Per instance: seconds billed, USD, whether it is destroyed."""
        now = time.time()
        return {i.id: {"seconds": (i.destroyed or now) - i.created, "destroyed": i.destroyed is not None,
                       "usd": i.offer["dph_total"] * ((i.destroyed or now) - i.created) / 3600, "label": i.label}
                for i in self.instances.values()}

    def alive(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.destroyed is None]

    # ------------------------------------------------------------------ instances

    def _create(self, offer: dict, label: str) -> Instance:
        with self.lock:
            self.next_id += 1
            iid = self.next_id
        d = self.root / f"instance-{iid}"
        (d / "home").mkdir(parents=True)  # each instance its own $HOME, as a fresh container would have
        inst = Instance(iid, offer, label, time.time(), d, _free_port())
        self.instances[iid] = inst
        if not self.never_ssh:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
            (d / "sshd_config").write_text(f"""Port {inst.port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {self.authorized_keys}
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
SetEnv ORCHD_EMU_INSTANCE={iid} HOME={d / 'home'} PATH={self.path}
MaxSessions 50
""")
            inst.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                         stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
        return inst

    def _destroy(self, inst: Instance) -> None:
        if inst.destroyed is not None:
            return
        inst.destroyed = time.time()
        victims = _tagged(f"ORCHD_EMU_INSTANCE={inst.id}")
        if inst.sshd:
            victims += [inst.sshd.pid, *_children(inst.sshd.pid)]
        for pid in set(victims):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if inst.sshd:
            inst.sshd.wait()

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: dict | None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _route(self, method: str) -> None:
                emu.calls.append(f"{method} {self.path}")
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self._reply(401, {"error": "unauthorized"})
                if emu.fail_rate and emu.rng.random() < emu.fail_rate:
                    return self._reply(emu.rng.choice([429, 503]), {"error": "try again"})
                path = self.path.split("?")[0]
                if method == "POST" and path == "/api/v0/bundles/":
                    q = self._body()
                    offers = [o for o in OFFERS if _matches(o, q)]
                    return self._reply(200, {"offers": sorted(offers, key=lambda o: o["dph_total"])})
                if method == "PUT" and (m := re.fullmatch(r"/api/v0/asks/(\d+)/", path)):
                    body = self._body()
                    offer = next((o for o in OFFERS if o["id"] == int(m[1])), None)
                    if offer is None:
                        return self._reply(404, {"error": "no_such_ask"})
                    inst = emu._create(offer, body.get("label") or "")
                    if emu.fail_after_alloc:
                        return self._reply(500, {"success": False, "error": "internal", "new_contract": inst.id})
                    return self._reply(200, {"success": True, "new_contract": inst.id})
                if method == "GET" and path == "/api/v1/instances/":
                    rows = [i.row() for i in emu.alive()]
                    return self._reply(200, {"instances": rows, "next_token": None})
                if m := re.fullmatch(r"/api/v0/instances/(\d+)/", path):
                    inst = emu.instances.get(int(m[1]))
                    if inst is None or inst.destroyed is not None:
                        if method == "DELETE":
                            return self._reply(404, {"error": "no_such_instance"})
                        return self._reply(200, {"instances": None})
                    if method == "GET":
                        return self._reply(200, {"instances": inst.row()})
                    if method == "DELETE":
                        emu._destroy(inst)
                        return self._reply(200, {"success": True})
                return self._reply(404, {"error": f"no route {method} {path}"})

            def do_GET(self) -> None:  # noqa: N802
                self._route("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._route("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._route("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._route("DELETE")

        return Handler


def _matches(offer: dict, q: dict) -> bool:
    """The subset of Vast's search filter the SDK sends for orchd's queries (numbers as strings)."""
    for key, cond in q.items():
        known = ("gpu_name", "num_gpus", "dph_total", "reliability2", "reliability")
        if key not in known or not isinstance(cond, dict):
            continue
        have = offer["reliability2"] if key.startswith("reliability") else offer[key]
        for op, want in cond.items():
            if key == "gpu_name":
                names = want if isinstance(want, list) else [want]
                ok = have in [str(n).replace("_", " ") for n in names] if op in ("eq", "in") else True
            else:
                w = float(want[0] if isinstance(want, list) else want)
                ok = {"eq": have == w, "lte": have <= w, "lt": have < w, "gte": have >= w, "gt": have > w}.get(op, True)
            if not ok:
                return False
    return True
