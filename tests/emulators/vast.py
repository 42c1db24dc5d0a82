"""A local emulator of the Vast.ai HTTP API, held to Vast's published OpenAPI document
(``tests/contracts/vast-api.openapi.yaml``): every request it receives and every response it
gives is validated against the operation's schemas; a request that breaks the contract is
answered 400 ``invalid_args`` (as Vast does), and every violation is kept in ``violations``.

Operations: offer search (``POST /api/v0/bundles/``, the filter operators orchd sends), create
(``PUT /api/v0/asks/<offer>/``), show (``GET /api/v0/instances/<id>/``), the paged list
(``GET /api/v1/instances/``, keyset pages of at most 25 with ``next_token``) and destroy
(``DELETE /api/v0/instances/<id>/``).

Rate limits are time-based at the thresholds the document's 429 examples name (create 4.5 s,
destroy 3 s, show 2 s, list 1 s between two calls of an endpoint; ``rate_scale`` shrinks them
for tests that are not about them): a call sooner than that after the last one answered is
429 ``API requests too frequent endpoint threshold=…``, without Retry-After; ``rate_limited``
counts them.

Instances are real (``hosts.HostPool``: an sshd per instance, billed per second at the offer's
$/hr). An instance is ``loading`` for ``boot_seconds``, then ``running`` with its direct SSH
pair (``public_ipaddr`` + ``ports["22/tcp"]``); its proxy pair (``ssh_host:ssh_port``) is a
port nothing answers on, so only a client that prefers the direct pair gets in. A destroyed
instance is listed for ``pool.linger`` seconds more. Faults: ``faults`` (503 and slow answers),
``pool.never_ssh``, ``fail_after_alloc`` (a create answers 500 after allocating, its id in the
body), ``host.meta["status"]`` (``exited``, ``offline``) and ``host.meta["status_msg"]``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.emulators.contract import Contract
from tests.emulators.hosts import Host, ProviderEmulator, _free_port, send_raw

API_KEY = "emu-key"
CONTRACT = Contract("vast-api.openapi.yaml")
# seconds between two calls of an endpoint: the thresholds in the document's 429 examples
THRESHOLDS = {"create": 4.5, "destroy": 3.0, "show": 2.0, "list": 1.0}
OFFERS = [
    {"id": 101, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.40, "gpu_ram": 24564, "reliability2": 0.99},
    {"id": 102, "gpu_name": "RTX 4090", "num_gpus": 1, "dph_total": 0.35, "gpu_ram": 24564, "reliability2": 0.97},
    {"id": 103, "gpu_name": "A100 SXM4", "num_gpus": 1, "dph_total": 1.10, "gpu_ram": 81920, "reliability2": 0.995},
    {"id": 104, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_total": 0.20, "gpu_ram": 24576, "reliability2": 0.90},
]


class Answer(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(str(body))
        self.status, self.body = status, body


@dataclass
class VastEmulator(ProviderEmulator):
    fail_after_alloc: bool = False
    boot_seconds: float = 0.0  # ``loading`` this long after the create (an image pull)
    rate_scale: float = 1.0  # × THRESHOLDS; 0 turns rate limits off
    calls: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    rate_limited: int = 0  # 429 answers given
    malformed_lists: int = 0  # this many list calls are answered {"instances": {}} (outside the contract)
    next_id: int = 5000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._last: dict[str, float] = {}
        self._rate_lock = threading.Lock()

    def _create(self, offer: dict, label: str) -> Host:
        with self.lock:
            self.next_id += 1
            iid = str(self.next_id)
        host = self.pool.start(iid, label, offer["dph_total"], offer=offer, proxy_port=_free_port())
        host.meta["billed_from"] = host.created + self.boot_seconds  # Vast bills GPU time from `running`
        return host

    def _status(self, h: Host) -> str:
        return h.meta.get("status") or ("running" if time.time() - h.created >= self.boot_seconds else "loading")

    def _row(self, h: Host, listed: bool) -> dict:
        """An instance as the list (``listed``) or show answers it: show's schema types ``ports`` as
        a list of integers, the list's as Docker's mapping (what the service sends), so only the
        list carries it."""
        offer, status = h.meta["offer"], self._status(h)
        gone = h.destroyed is not None  # destroyed, still listed for a while
        row = {"id": int(h.id), "actual_status": status, "intended_status": "stopped" if gone else "running",
               "cur_state": "running", "next_state": "stopped" if gone else "running",
               "status_msg": h.meta.get("status_msg") or f"success, running {status}", "label": h.label or None,
               "gpu_name": offer["gpu_name"], "num_gpus": offer["num_gpus"], "dph_total": offer["dph_total"],
               "ssh_host": "127.0.0.1", "ssh_port": h.meta["proxy_port"], "public_ipaddr": "127.0.0.1",
               "start_date": h.created, "extra_env": [], "image_uuid": "pytorch/pytorch", "machine_id": 77}
        if listed:
            row["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(h.port)}]} if status == "running" else None
        return row

    def _limit(self, endpoint: str) -> None:
        threshold = THRESHOLDS[endpoint] * self.rate_scale
        with self._rate_lock:
            now = time.time()
            if threshold and now - self._last.get(endpoint, 0.0) < threshold:
                self.rate_limited += 1
                raise Answer(429, {"detail": f"API requests too frequent endpoint threshold={THRESHOLDS[endpoint]}"})
            self._last[endpoint] = now

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict | None) -> tuple[int, dict]:
        if method == "POST" and path == "/api/v0/bundles/":
            offers = [o for o in OFFERS if _matches(o, body or {})]
            limit = (body or {}).get("limit") or len(offers)
            return 200, {"offers": sorted(offers, key=lambda o: o["dph_total"])[:limit]}
        if method == "PUT" and (m := re.fullmatch(r"/api/v0/asks/(\d+)/", path)):
            self._limit("create")
            offer = next((o for o in OFFERS if o["id"] == int(m[1])), None)
            if offer is None:
                raise Answer(404, {"success": False, "error": "invalid_args",
                                   "msg": f"error 404/3603: no_such_ask Instance type by id {m[1]} is not available."})
            inst = self._create(offer, (body or {}).get("label") or "")
            if self.fail_after_alloc:
                raise Answer(500, {"success": False, "error": "internal", "new_contract": int(inst.id)})
            return 200, {"success": True, "new_contract": int(inst.id)}
        if method == "GET" and path == "/api/v1/instances/":
            self._limit("list")
            limit = min(25, int((query.get("limit") or ["25"])[0]))
            after = int((query.get("after_token") or ["0"])[0])
            listed = sorted(self.pool.listed(), key=lambda h: int(h.id))
            rest = [h for h in listed if int(h.id) > after]
            page = rest[:limit]
            return 200, {"success": True, "instances": [self._row(h, listed=True) for h in page],
                         "instances_found": len(page), "total_instances": len(listed),
                         "next_token": page[-1].id if len(rest) > limit else None}
        if m := re.fullmatch(r"/api/v0/instances/(\d+)/", path):
            self._limit("show" if method == "GET" else "destroy")
            inst = self.pool.hosts.get(m[1])
            listed = inst is not None and inst in self.pool.listed()
            if method == "GET":
                return 200, {"instances": self._row(inst, listed=False) if listed else None}
            if method == "DELETE":
                if not listed:
                    raise Answer(404, {"success": False, "error": "not_found", "msg": "Instance not found"})
                if self.pool.refuses_destroy(inst):
                    raise Answer(500, {"success": False, "error": "internal", "msg": "internal"})
                self.pool.destroy(inst)
                return 200, {"success": True, "msg": "Instance destroyed successfully"}
        raise Answer(404, {"success": False, "error": "not_found", "msg": f"no route {method} {path}"})

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, method: str, path: str, code: int, body: dict) -> None:
                if code < 500:  # 5xx are the emulator's injected faults: the document lists none
                    emu.violations.extend(CONTRACT.check_response(method, path, code, body))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                emu.calls.append(f"{method} {self.path}")
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                emu.arrive(url.path)
                try:
                    public = method == "POST" and url.path == "/api/v0/bundles/"  # offer search needs no key
                    if not public and self.headers.get("Authorization") != f"Bearer {API_KEY}":
                        raise Answer(401, {"success": False, "error": "auth_error", "msg": "Invalid user key"})
                    wrong = CONTRACT.check_request(method, url.path, query, body)
                    if wrong:
                        emu.violations.extend(wrong)
                        raise Answer(400, {"success": False, "error": "invalid_args", "msg": "; ".join(wrong)[:500]})
                    if code := emu.faults.status():
                        raise Answer(code, {"success": False, "error": "try_again", "msg": f"upstream {code}"})
                    if emu.malformed_lists and url.path == "/api/v1/instances/":
                        emu.malformed_lists -= 1
                        return send_raw(self, b'{"instances": {}}')
                    code, out = emu.route(method, url.path, query, body)
                    self._reply(method, url.path, code, out)
                except Answer as a:
                    self._reply(method, url.path, a.status, a.body)

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
    """Vast's search filter (``{"field": {"op": value}}``, the operators the document lists) on
    the fields the emulated offers have; ``reliability`` is the offer's ``reliability2``."""
    for key, cond in q.items():
        field_name = "reliability2" if key == "reliability" else key
        if field_name not in offer or not isinstance(cond, dict):
            continue
        have = offer[field_name]
        for op, want in cond.items():
            if key == "gpu_name":
                names = [str(n).replace("_", " ") for n in (want if isinstance(want, list) else [want])]
                ok = {"eq": have in names, "in": have in names, "neq": have not in names,
                      "notin": have not in names}.get(op, True)
            elif op in ("in", "notin"):
                ok = (have in [float(w) for w in want]) == (op == "in")
            else:
                w = float(want)
                ok = {"eq": have == w, "neq": have != w, "lte": have <= w, "lt": have < w, "gte": have >= w,
                      "gt": have > w}.get(op, True)
            if not ok:
                return False
    return True
