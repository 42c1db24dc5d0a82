"""A local emulator of RunPod's REST API v2 (``https://api.runpod.io/v2``), held to RunPod's
published OpenAPI document (``tests/contracts/runpod-rest-v2.openapi.json``): every request
it receives and every response it gives is validated against the operation's schemas; a
request that breaks the contract is answered 422 as upstream does, and every violation (ours or
the emulator's) is kept in ``violations`` for the tests to assert on.

Operations: ``GET /v2/catalog/gpus`` (``include=AVAILABILITY&product=POD``, ``count``,
``cloud``), ``POST /v2/pods``, ``GET /v2/pods``, ``GET /v2/pods/{id}``, ``DELETE /v2/pods/{id}``.
Errors are ``application/problem+json`` (``title``, ``status``, ``detail``); a wrong key is 401;
a rate limit is 429 with ``Retry-After``; no capacity is 400 (the contract's table of failures).

Pods are real (``hosts.HostPool``): an sshd per pod, reachable through ``ssh.direct`` once the
pod is ``RUNNING`` (after ``boot_seconds`` in ``PROVISIONING``), authorising the pod's
``PUBLIC_KEY`` env, billed per second at the GPU type's price × count. sshd runs only if the
image starts it (``runpod/*`` images do when ``PUBLIC_KEY`` is set, as RunPod's own do) or the
pod's ``args`` start it (what orchd sends for other images). Faults: ``faults`` (429 / 503,
slow answers), ``no_capacity`` (GPU type ids sold out: catalog NONE, create 400),
``fail_after_alloc`` (a create allocates, then answers 500).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.emulators.contract import Contract
from tests.emulators.hosts import Host, ProviderEmulator, send_raw

API_KEY = "emu-runpod-key"
CONTRACT = Contract("runpod-rest-v2.openapi.json")
SSHD_MARK = "/usr/sbin/sshd"  # a pod whose args run this has an sshd, whatever its image

# per-GPU $/hr per cloud; None: not offered in that cloud
GPU_TYPES = [
    {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "memory": 24, "maxCount": 8, "secure": 0.69,
     "community": 0.34},
    {"id": "NVIDIA A100 80GB PCIe", "name": "A100 PCIe", "memory": 80, "maxCount": 8, "secure": 1.64,
     "community": 1.19},
    {"id": "NVIDIA RTX A5000", "name": "RTX A5000", "memory": 24, "maxCount": 4, "secure": None, "community": 0.16},
]


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}


@dataclass
class RunPodEmulator(ProviderEmulator):
    no_capacity: set[str] = field(default_factory=set)
    fail_after_alloc: bool = False
    boot_seconds: float = 0.0  # PROVISIONING this long after the create (an image pull)
    fail_first_with: str | None = None  # the next pod created goes to this status (ERROR, EXITED) at once
    malformed_lists: int = 0  # this many GET /v2/pods are answered {"pods": {}} (outside the contract)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every call
    violations: list[str] = field(default_factory=list)  # contract violations seen, either way

    # ------------------------------------------------------------------ resources

    def _gpu_type(self, g: dict, count: int, cloud: str) -> dict:
        price = g[cloud.lower()]
        stock = "NONE" if g["id"] in self.no_capacity or price is None or count > g["maxCount"] else "HIGH"
        return {"id": g["id"], "name": g["name"], "pool": None, "manufacturer": "NVIDIA", "memory": g["memory"],
                "secure": g["secure"] is not None, "community": g["community"] is not None,
                "price": {"secure": g["secure"] or 0.0, "community": g["community"] or 0.0},
                "maxCount": {"secure": g["maxCount"] if g["secure"] else 0,
                             "community": g["maxCount"] if g["community"] else 0},
                "availability": stock}

    def _status(self, h: Host) -> str:
        if h.destroyed is not None and time.time() - h.destroyed >= self.pool.linger:
            return "TERMINATED"  # (still listed for ``pool.linger`` s as it was: the list lags the delete)
        return h.meta.get("status") or ("RUNNING" if time.time() - h.created >= self.boot_seconds else "PROVISIONING")

    def _pod(self, h: Host) -> dict:
        status = self._status(h)
        running = status == "RUNNING"
        started = h.created + self.boot_seconds
        direct = ({"host": "127.0.0.1", "port": h.port, "username": "root",
                   "command": f"ssh root@127.0.0.1 -p {h.port}"} if running and "22/tcp" in h.meta["ports"] else None)
        proxy = {"host": "ssh.runpod.io", "port": 22, "username": f"{h.id}-64411eb2",
                 "command": f"ssh {h.id}-64411eb2@ssh.runpod.io"}
        return {
            "id": h.id, "name": h.label, "status": status,
            "actions": ["stop", "restart", "terminate"] if running else ["terminate"],
            "image": h.meta["image"], "args": h.meta["args"], "disk": h.meta["disk"], "mounts": {},
            "ports": h.meta["ports"], "env": h.meta["env"], "registry": None, "cloud": h.meta["cloud"],
            "dataCenterId": "EU-RO-1", "cudaVersion": "12.8", "ssh": {"proxy": proxy, "direct": direct},
            "template": None, "cost": h.usd_per_hour if status in ("PROVISIONING", "STARTING", "RUNNING") else 0.0,
            "locked": False,
            "runtime": ({"uptime": int(time.time() - started),
                         "ports": [{"private": 22, "public": h.port, "type": "tcp", "ip": "127.0.0.1"}]}
                        if running else None),
            "createdAt": _iso(h.created), "startedAt": _iso(started) if running else None,
            "globalNetworking": {"enabled": False}, "gpu": {"id": h.meta["gpu"]["id"], "count": h.meta["gpu_count"]},
        }

    def _live(self, pod_id: str) -> Host:
        h = self.pool.hosts.get(pod_id)
        if h is None or h.destroyed is not None:
            raise Problem(404, "Not Found", "pod not found")
        return h

    # ------------------------------------------------------------------ operations

    def catalog(self, query: dict[str, list[str]]) -> tuple[int, dict]:
        if query.get("include") and not query.get("product"):
            raise Problem(400, "Bad Request", "product is required with include=AVAILABILITY")
        count = int((query.get("count") or ["1"])[0])
        cloud = (query.get("cloud") or ["SECURE"])[0]
        return 200, {"gpus": [self._gpu_type(g, count, cloud) for g in GPU_TYPES]}

    def create(self, body: dict) -> tuple[int, dict]:
        gpu = next((g for g in GPU_TYPES if g["id"] == body["gpu"]["id"]), None)
        if gpu is None:
            raise Problem(400, "Bad Request", f"GPU type {body['gpu']['id']!r} does not exist")
        count, cloud = body["gpu"].get("count", 1), body.get("cloud", "SECURE")
        price = gpu[cloud.lower()]
        if gpu["id"] in self.no_capacity or price is None or count > gpu["maxCount"]:
            raise Problem(400, "Bad Request", "There are no longer any instances available with the requested "
                                              "specifications. Please refresh and try again.")
        env = dict(body.get("env") or {})
        image, args = body.get("image", ""), body.get("args", "")
        # RunPod's own images start sshd from PUBLIC_KEY; any other image only if its args do
        has_sshd = (image.startswith("runpod/") and "PUBLIC_KEY" in env) or SSHD_MARK in args
        pod_id = uuid.uuid4().hex[:14]
        h = self.pool.start(pod_id, body["name"], round(price * count, 4), env.get("PUBLIC_KEY"), ssh=has_sshd,
                            gpu=gpu, gpu_count=count, image=image, args=args, disk=body.get("disk", 50),
                            env=env, ports=list(body.get("ports") or []), cloud=cloud)
        if self.fail_first_with:
            h.meta["status"], self.fail_first_with = self.fail_first_with, None
        if self.fail_after_alloc:
            raise Problem(500, "Internal Server Error", "internal error after allocation")
        return 201, self._pod(h)

    def delete(self, pod_id: str) -> tuple[int, None]:
        pod = self._live(pod_id)
        if self.pool.refuses_destroy(pod):
            raise Problem(500, "Internal Server Error", "Something went wrong. Please try again later.")
        self.pool.destroy(pod)
        return 204, None

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict | None) -> tuple[int, dict | None]:
        parts = path.rstrip("/").split("/")
        if method == "GET" and path.rstrip("/") == "/v2/catalog/gpus":
            return self.catalog(query)
        if path.rstrip("/") == "/v2/pods":
            if method == "POST":
                return self.create(body or {})
            return 200, {"pods": [self._pod(h) for h in self.pool.listed()]}
        if len(parts) == 4 and parts[:3] == ["", "v2", "pods"]:
            if method == "GET":
                return 200, self._pod(self._live(parts[3]))
            if method == "DELETE":
                return self.delete(parts[3])
        raise Problem(404, "Not Found", f"{method} {path} is not emulated")

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, method: str, path: str, code: int, body: dict | None,
                       headers: dict[str, str] | None = None) -> None:
                emu.violations += CONTRACT.check_response(method, path, code, body)
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(code)
                kind = "application/problem+json" if code >= 400 else "application/json"
                if body is not None:
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("RateLimit", '"default";r=99;t=1')
                self.send_header("RateLimit-Policy", '"default";q=100;w=10')
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                emu.requests.append((method, url.path))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                emu.arrive(url.path)
                try:
                    if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                        raise Problem(401, "Unauthorized", "invalid or missing API key")
                    wrong = CONTRACT.check_request(method, url.path, query, body)
                    if wrong:
                        emu.violations += wrong
                        raise Problem(422, "Unprocessable Entity", "Request validation failed.")
                    if code := emu.faults.status():
                        raise Problem(code, "Too Many Requests" if code == 429 else "Service Unavailable",
                                      f"upstream error {code}", {"Retry-After": "1"} if code == 429 else {})
                    if emu.malformed_lists and method == "GET" and url.path.rstrip("/") == "/v2/pods":
                        emu.malformed_lists -= 1
                        return send_raw(self, b'{"pods": {}}')
                    code, out = emu.route(method, url.path, query, body)
                    self._reply(method, url.path, code, out)
                except Problem as p:
                    err = {"title": p.title, "status": p.status, "detail": p.detail}
                    if p.status == 422:
                        err["errors"] = wrong[:20]
                    self._reply(method, url.path, p.status, err, p.headers)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        return Handler
