"""A local emulator of the Vast.ai HTTP API, for driving the real ``vastai`` SDK in tests.

It implements the endpoints the SDK calls (../shared/notes/providers.md): offer search
(``POST /api/v0/bundles/``), create (``PUT /api/v0/asks/<offer>/``), show one
(``GET /api/v0/instances/<id>/``), list (``GET /api/v1/instances/``, keyset pages of 25 with ``next_token``) and destroy
(``DELETE /api/v0/instances/<id>/``), with the response fields the SDK and orchd read.

Instances are real (``hosts.HostPool``: an sshd per instance, billed per second at the
offer's $/hr). Faults: ``faults`` (429/503 and slow answers), ``pool.never_ssh`` (instances
never start their sshd), ``fail_after_alloc`` (a create answers 500 after allocating the
instance, its id in the error body).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.emulators.hosts import Host, ProviderEmulator

API_KEY = "emu-key"
OFFERS = [
    {"id": 101, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.40, "gpu_ram": 24564, "reliability2": 0.99},
    {"id": 102, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.35, "gpu_ram": 24564, "reliability2": 0.97},
    {"id": 103, "gpu_name": "A100 SXM4", "num_gpus": 1, "dph_total": 1.10, "gpu_ram": 81920, "reliability2": 0.995},
    {"id": 104, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_total": 0.20, "gpu_ram": 24576, "reliability2": 0.90},
]


def _row(h: Host) -> dict:
    offer = h.meta["offer"]
    return {"id": int(h.id), "actual_status": h.meta.get("status") or ("running" if h.sshd else "loading"),
            "intended_status": "running", "cur_state": "running", "next_state": "running",
            "status_msg": h.meta.get("status_msg", ""), "label": h.label,
            "gpu_name": offer["gpu_name"], "num_gpus": offer["num_gpus"], "dph_total": offer["dph_total"],
            "ssh_host": "127.0.0.1", "ssh_port": h.port, "public_ipaddr": "127.0.0.1",
            "ports": {"22/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(h.port)}]},
            "start_date": h.created, "extra_env": []}


@dataclass
class VastEmulator(ProviderEmulator):
    fail_after_alloc: bool = False
    calls: list[str] = field(default_factory=list)
    next_id: int = 5000

    def _create(self, offer: dict, label: str) -> Host:
        with self.lock:
            self.next_id += 1
            iid = str(self.next_id)
        return self.pool.start(iid, label, offer["dph_total"], offer=offer)

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
                if code := emu.faults.status():
                    return self._reply(code, {"error": "try again"})
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
                        return self._reply(500, {"success": False, "error": "internal", "new_contract": int(inst.id)})
                    return self._reply(200, {"success": True, "new_contract": int(inst.id)})
                if method == "GET" and path == "/api/v1/instances/":
                    # keyset pages of at most 25 (Vast's documented maximum), next_token: the last id sent
                    q = parse_qs(urlsplit(self.path).query)
                    limit = min(25, int((q.get("limit") or ["25"])[0]))
                    after = int((q.get("after_token") or ["0"])[0])
                    alive = sorted(emu.pool.alive(), key=lambda h: int(h.id))
                    rest = [h for h in alive if int(h.id) > after]
                    page = rest[:limit]
                    more = len(rest) > limit
                    return self._reply(200, {"success": True, "instances": [_row(h) for h in page],
                                             "instances_found": len(page), "total_instances": len(alive),
                                             "next_token": page[-1].id if more else None})
                if m := re.fullmatch(r"/api/v0/instances/(\d+)/", path):
                    inst = emu.pool.hosts.get(m[1])
                    if inst is None or inst.destroyed is not None:
                        if method == "DELETE":
                            return self._reply(404, {"error": "no_such_instance"})
                        return self._reply(200, {"instances": None})
                    if method == "GET":
                        return self._reply(200, {"instances": _row(inst)})
                    if method == "DELETE":
                        if inst.id in emu.pool.undying:
                            return self._reply(500, {"error": "internal"})
                        emu.pool.destroy(inst)
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
