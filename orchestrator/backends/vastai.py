"""Backend ``vastai``: Vast.ai instances through Vast's HTTP API (``https://console.vast.ai``).

The contract is Vast's published OpenAPI document (vast-ai/docs ``api-reference/openapi.yaml``;
a copy in ``tests/contracts/vast-api.openapi.yaml``, against which the tests validate every
call). The official ``vastai`` SDK is not used: it sends bodies that document rejects
(``type: "on-demand"``, ``runtype: "ssh_direc ssh_proxy"``), retries 429s on its own clock (so
no limiter can pace it), raises ``KeyError`` on rows without ``start_date``, and pins
``cryptography==49.0.0``. Four calls on ``httpx`` instead:

- offers: ``POST /api/v0/bundles/`` filtered server-side (``gpu_name in``, ``num_gpus eq``,
  ``dph_total lte``, ``reliability gte``, verified, rentable, on-demand) with a ``limit``,
  ordered by ``dph_total`` (gpuhunt and SkyPilot filter the same way: a client-side filter on a
  cut-short answer misses offers);
- create: ``PUT /api/v0/asks/{offer}/`` with ``runtype: ssh_direct`` (Vast runs sshd and
  authorises the account's keys) and ``cancel_unavail``;
- list: ``GET /api/v1/instances/`` in keyset pages of at most 25 (``next_token``), to the end;
- destroy: ``DELETE /api/v0/instances/{id}/`` (404: gone).

Rate limits: Vast answers 429 without ``Retry-After`` when an endpoint is called more often
than its threshold (the document's 429 examples: create 4.5 s, destroy 3 s, show 2 s, list 1 s;
offer search about 10 a minute). Every call waits its turn on a ``RateLimiter`` per endpoint
shared by all orchd processes of this ``$ORCHD_HOME``; a 429 pushes the endpoint's next slot
later for all of them and is retried.

SSH: the direct pair (``public_ipaddr`` and the host port mapped to ``22/tcp``) is preferred;
Vast's proxy (``ssh_host:ssh_port``, "slower for data transfer") only when there is none.
Host and port always come from the same pair.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from orchestrator.backends.cloud import CloudBackend, Instance, Offer
from orchestrator.clusters import VastAI as VastConfig
from orchestrator.config import api_key
from orchestrator.ratelimit import RateLimiter
from orchestrator.spec import JobSpec

# seconds between two calls of one endpoint: the thresholds Vast's 429 answers name (openapi.yaml)
# and its documented ~10 offer searches a minute
RATE_LIMITS = {"search": 6.0, "create": 4.5, "show": 2.0, "list": 1.0, "destroy": 3.0}
OFFER_LIMIT = 64  # offers asked for per search: enough to skip the ones that fail
OFFER_CACHE_SECONDS = 30.0  # parallel launches of one spec share a search (searches are the scarcest call)
FATAL_MESSAGES = ("OCI runtime", "Error response from daemon", "error starting", "unknown manifest")


class VastError(Exception):
    """A non-2xx answer: ``status``, Vast's ``error`` code and ``msg``; ``retry_after`` (s) for a 429
    (Vast sends no Retry-After: the endpoint's interval)."""

    def __init__(self, status: int, error: str, msg: str, retry_after: float | None = None, body: Any = None):
        super().__init__(f"{status} {error}: {msg}".strip())
        self.status, self.code, self.msg, self.retry_after, self.body = status, error, msg, retry_after, body

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500


class VastAPI:
    """The calls orchd makes, each paced by its endpoint's shared limiter. Raises VastError for an
    error answer and httpx.HTTPError when the API cannot be reached; the key is sent as
    ``Authorization: Bearer`` and never appears in an error. ``rate_429`` counts 429 answers."""

    def __init__(self, base_url: str, key: str, limits_dir: Path, intervals: dict[str, float] | None = None,
                 timeout: float = 30.0):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}", "Accept": "application/json"})
        # one limiter set per account and server: the key is hashed, never written anywhere
        account = hashlib.sha256(f"{base_url}\0{key}".encode()).hexdigest()[:12]
        # 5 % and 20 ms over each threshold: Vast times calls as they arrive, and they do not arrive
        # as evenly as they leave
        self.limiters = {name: RateLimiter(limits_dir / f"vastai-{account}-{name}", seconds * 1.05 + 0.02)
                         for name, seconds in {**RATE_LIMITS, **(intervals or {})}.items()}
        self.rate_429 = 0
        self._offers: dict[str, tuple[float, list[dict]]] = {}
        self._offers_lock = threading.Lock()

    def call(self, endpoint: str, method: str, path: str, params: dict[str, Any] | None = None,
             body: Any = None) -> Any:
        limiter = self.limiters[endpoint]
        limiter.wait()
        r = self.http.request(method, path, params=params, json=body)
        if r.status_code >= 400:
            try:
                answer = r.json()
            except ValueError:
                answer = {}
            answer = answer if isinstance(answer, dict) else {}
            retry = None
            if r.status_code == 429:
                self.rate_429 += 1
                retry = 2 * limiter.interval
                limiter.penalize(retry)  # every orchd process backs off, not only this call
            raise VastError(r.status_code, str(answer.get("error") or r.reason_phrase),
                            str(answer.get("msg") or answer.get("detail") or r.text[:200]), retry, answer)
        answer = r.json() if r.content else {}
        if not isinstance(answer, dict):  # every operation orchd calls answers an object
            raise VastError(r.status_code, "bad_answer", f"{method} {path} answered {type(answer).__name__}")
        return answer

    def search_offers(self, query: dict) -> list[dict]:
        """Offers matching ``query`` (a bundles filter), cheapest first; the same query within
        OFFER_CACHE_SECONDS is answered from the last search."""
        key = json.dumps(query, sort_keys=True)
        with self._offers_lock:  # one search at a time: parallel launches wait for the first's answer
            hit = self._offers.get(key)
            if hit and time.time() - hit[0] < OFFER_CACHE_SECONDS:
                return hit[1]
            offers = self.call("search", "POST", "/api/v0/bundles/", body=query).get("offers")
            if not isinstance(offers, list):
                raise VastError(200, "bad_answer", f"offers is {type(offers).__name__}, not a list")
            self._offers[key] = (time.time(), offers)
            return offers

    def create(self, offer_id: int, body: dict) -> dict:
        return self.call("create", "PUT", f"/api/v0/asks/{offer_id}/", body=body)

    def list_all(self) -> list[dict]:
        """Every instance of the account: pages of 25 followed through ``next_token`` to the end."""
        rows: list[dict] = []
        params: dict[str, Any] = {"limit": 25}
        for _ in range(10_000):  # a server that never stops paging is an error, not a hang
            page = self.call("list", "GET", "/api/v1/instances/", params=params)
            items = page.get("instances")
            if not isinstance(items, list):  # {"instances": {}} once crashed the SDK; never "no instances"
                raise VastError(200, "bad_answer", f"instances is {type(items).__name__}, not a list")
            if not all(isinstance(r, dict) and isinstance(r.get("id"), int) for r in items):
                raise VastError(200, "bad_answer", "an instance row without an integer id")  # never skipped quietly
            rows += items
            token = page.get("next_token")
            if not token or not items:
                return rows
            params = {"limit": 25, "after_token": str(token)}
        raise VastError(200, "bad_answer", "the instance list did not end after 10,000 pages")

    def destroy(self, iid: int) -> None:
        try:
            self.call("destroy", "DELETE", f"/api/v0/instances/{iid}/")
        except VastError as e:
            if e.status != 404:  # already gone is what we want
                raise


def _address(row: dict) -> tuple[str, int] | None:
    """SSH (host, port): the direct pair if the instance has one, else Vast's proxy pair."""
    mapped = ((row.get("ports") if isinstance(row.get("ports"), dict) else {}) or {}).get("22/tcp") or []
    if row.get("public_ipaddr") and mapped and isinstance(mapped[0], dict) and mapped[0].get("HostPort"):
        return str(row["public_ipaddr"]).strip(), int(mapped[0]["HostPort"])
    if row.get("ssh_host") and row.get("ssh_port"):
        return str(row["ssh_host"]), int(row["ssh_port"])
    return None


def _instance(row: dict) -> Instance:
    """An instance row as an Instance: SSH once ``actual_status`` is ``running``; ``fatal`` when
    Vast says the container exited, the machine is offline, or the image failed to start."""
    status, msg = row.get("actual_status"), str(row.get("status_msg") or "")
    address = _address(row) if status == "running" else None
    fatal = (f"actual_status {status}: {msg[:200]}".rstrip(": ") if status in ("exited", "offline")
             or any(m in msg for m in FATAL_MESSAGES) else None)
    price = row.get("dph_total")
    return Instance(str(row["id"]), str(row.get("label") or ""), address,
                    float(price) if isinstance(price, int | float) else None, fatal)


class VastBackend(CloudBackend):
    """Attempts on Vast.ai instances (ids are Vast's instance ids, as strings)."""

    name = "vastai"
    bills_from_running = True  # GPU time from `running` (Vast's pricing docs); storage from creation is cents
    api_errors = (httpx.HTTPError, VastError, KeyError, TypeError, ValueError)

    def __init__(self, cfg: VastConfig, state_dir: Path):
        super().__init__(cfg, state_dir)
        self.client = VastAPI(cfg.server_url, api_key(cfg.api_key_env), state_dir / "ratelimit", cfg.rate_limits)

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, httpx.TransportError) or (isinstance(error, VastError) and error.transient)

    def find_offers(self, spec: JobSpec) -> list[Offer]:
        r = spec.resources
        count = max(1, r.gpus_per_node)
        query: dict[str, Any] = {"verified": {"eq": True}, "rentable": {"eq": True}, "rented": {"eq": False},
                                 "num_gpus": {"eq": count}, "type": "ondemand", "allocated_storage": r.disk_gb,
                                 "limit": OFFER_LIMIT,
                                 # two [field, direction] pairs: the document's schema asks for exactly two
                                 "order": [["dph_total", "asc"], ["reliability", "desc"]]}
        wanted = sorted({g.replace("_", " ") for g in r.gpu or []})
        if wanted:
            query["gpu_name"] = {"in": wanted}
        if r.max_usd_per_hour:
            query["dph_total"] = {"lte": r.max_usd_per_hour}
        if r.min_reliability is not None:
            query["reliability"] = {"gte": r.min_reliability}
        offers = []
        for o in self.api(self.client.search_offers, query):
            # the server filtered; a row that does not fit anyway (or cannot be read) is still no offer
            try:
                usd, gpus, name = float(o["dph_total"]), int(o["num_gpus"]), str(o["gpu_name"])
            except (KeyError, TypeError, ValueError):
                continue
            if gpus != count or (wanted and name not in wanted) or (r.max_usd_per_hour and usd > r.max_usd_per_hour):
                continue
            offers.append(Offer(str(o["id"]), usd, f"offer {o['id']} ({gpus}× {name}, ${usd:.3f}/hr)"))
        return sorted(offers, key=lambda o: o.usd_per_hour)

    def create(self, offer: Offer, spec: JobSpec, label: str) -> str:
        body = {"image": spec.resources.image, "label": label, "disk": float(spec.resources.disk_gb),
                "runtype": "ssh_direct", "target_state": "running", "cancel_unavail": True}
        answer = self.client.create(int(offer.id), body)
        if not isinstance(answer, dict) or not answer.get("new_contract"):
            raise VastError(200, "bad_answer", f"create answered no new_contract: {str(answer)[:200]}")
        return str(answer["new_contract"])

    def allocated_in(self, error: BaseException) -> str | None:
        """Vast's create can fail after allocating, with the id in the error body (dstack reads it too)."""
        body = getattr(error, "body", None)
        leaked = body.get("new_contract") if isinstance(body, dict) else None
        return str(leaked) if leaked else None

    def create_retryable(self, error: BaseException) -> bool:
        """429 (nothing was allocated) and 5xx are sent again once nothing is left; 400 (bad
        arguments), 404/410 (the offer is gone) and 403 are not: the next offer is tried."""
        return self.is_transient(error)

    def list_instances(self) -> list[Instance]:
        return [_instance(r) for r in self.client.list_all()]

    def destroy_call(self, iid: str) -> None:
        self.client.destroy(int(iid))

    @property
    def rate_limited(self) -> int:
        """429 answers received by this process (each was waited out and retried)."""
        return self.client.rate_429
