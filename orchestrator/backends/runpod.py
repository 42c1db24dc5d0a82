"""Backend ``runpod``: RunPod GPU pods through RunPod's REST API v2 (``https://api.runpod.io/v2``).

The contract is RunPod's published OpenAPI document (api-reference-v2/openapi.json; a copy in
``tests/contracts/runpod-rest-v2.openapi.json``, against which the tests validate every
call). GraphQL (what the ``runpod`` SDK speaks) is being switched off (REST v1 answers 410 since
2026-11-15, GraphQL follows in early 2027), and no released SDK speaks v2 for pods, so this is
a small client on ``httpx`` for the five calls orchd needs:

- offers: ``GET /v2/catalog/gpus?include=AVAILABILITY&product=POD&count=N&cloud=C``, one per
  cloud (``resources.cloud_type`` ALL asks both); a type with ``availability`` NONE, not in
  that cloud, or with fewer than N GPUs per machine (``maxCount``) is no offer; the price is
  ``price[cloud]`` per GPU × N;
- ``POST /v2/pods`` with ``startSsh``, the public key as ``PUBLIC_KEY``, ``22/tcp`` published,
  and, for an image that is not RunPod's own (which start sshd from ``PUBLIC_KEY``), ``args``
  that install and start sshd first (as dstack and SkyPilot do);
- ``GET /v2/pods`` (every pod: where SSH is, and whether a pod is gone), ``DELETE /v2/pods/{id}``
  (404: gone).

SSH goes to ``ssh.direct`` (the proxy carries no SFTP). Failures follow the create operation's
table: 422 and 400 (no capacity or a rule) are not retried (the next offer is tried), 429 waits
``Retry-After``, 5xx and connection errors are retried.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx

from orchestrator.backends.cloud import CloudBackend, Instance, Offer
from orchestrator.clusters import RunPod as RunPodConfig
from orchestrator.config import api_key
from orchestrator.spec import JobSpec

# args for an image without sshd: install it if missing, authorise PUBLIC_KEY, start it, stay up
SSHD_BOOTSTRAP = (
    "bash -c 'if [ ! -x /usr/sbin/sshd ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
    "apt-get install -y -qq openssh-server) >/dev/null 2>&1; fi; mkdir -p ~/.ssh /run/sshd && chmod 700 ~/.ssh "
    "&& echo \"$PUBLIC_KEY\" >> ~/.ssh/authorized_keys && ssh-keygen -A >/dev/null 2>&1; /usr/sbin/sshd; "
    "sleep infinity'")
LIVE = ("PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR")  # everything but TERMINATED bills or may


class RunPodError(Exception):
    """A non-2xx answer: ``status``, and the problem's ``title``/``detail`` (RFC 9457 body);
    ``retry_after`` seconds for a 429."""

    def __init__(self, status: int, title: str, detail: str, retry_after: float | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail, self.retry_after = status, title, detail, retry_after

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500


class RunPodAPI:
    """The REST v2 calls orchd makes. Raises RunPodError for an error answer, httpx.HTTPError
    when the API cannot be reached. The key is sent as ``Authorization: Bearer`` and never
    appears in an error."""

    def __init__(self, base_url: str, key: str, timeout: float = 30.0):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}", "Accept": "application/json"})

    def call(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        r = self.http.request(method, path, params=params, json=body)
        if r.status_code >= 400:
            try:
                problem = r.json()
            except ValueError:
                problem = {}
            retry = r.headers.get("Retry-After")
            raise RunPodError(r.status_code, str(problem.get("title") or r.reason_phrase),
                              str(problem.get("detail") or r.text[:200]),
                              float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
        return r.json() if r.content else None

    def gpu_types(self, count: int, cloud: str) -> list[dict]:
        return self.call("GET", "/v2/catalog/gpus", {"include": "AVAILABILITY", "product": "POD", "count": count,
                                                     "cloud": cloud})["gpus"]

    def create_pod(self, body: dict) -> dict:
        return self.call("POST", "/v2/pods", body=body)

    def list_pods(self) -> list[dict]:
        """Every pod of the account. Raises RunPodError if the answer is not a list of pods: a
        malformed answer must never read as "no pods" (every attempt would look lost)."""
        answer = self.call("GET", "/v2/pods")
        pods = answer.get("pods") if isinstance(answer, dict) else None
        if not isinstance(pods, list) or not all(isinstance(p, dict) and p.get("id") for p in pods):
            raise RunPodError(200, "Bad Answer", f"GET /v2/pods answered {str(answer)[:200]}")
        return pods

    def delete_pod(self, pod_id: str) -> None:
        try:
            self.call("DELETE", f"/v2/pods/{pod_id}")
        except RunPodError as e:
            if e.status != 404:  # already gone is what we want
                raise


def _instance(pod: dict) -> Instance:
    """A pod as an Instance: SSH at ``ssh.direct`` once it is RUNNING; ``cost`` is its $/hr; a pod
    that EXITED or is in ERROR can never run what orchd started (``fatal``)."""
    status = pod.get("status")
    direct = (pod.get("ssh") or {}).get("direct") if status == "RUNNING" else None
    address = (str(direct["host"]), int(direct["port"])) if direct else None
    fatal = f"pod status {status}" if status in ("EXITED", "ERROR") else None
    return Instance(str(pod["id"]), str(pod.get("name") or ""), address, pod.get("cost"), fatal)


class RunPodBackend(CloudBackend):
    """Attempts on RunPod pods (ids are pod ids)."""

    name = "runpod"
    api_errors = (httpx.HTTPError, RunPodError, ValueError, KeyError, TypeError)

    def __init__(self, cfg: RunPodConfig, state_dir: Path):
        super().__init__(cfg, state_dir)
        self.client = RunPodAPI(cfg.api_url, api_key(cfg.api_key_env))
        pub = Path(cfg.ssh_key).expanduser().with_suffix(".pub")
        self.public_key = pub.read_text().strip() if pub.exists() else None

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, httpx.TransportError) or (isinstance(error, RunPodError) and error.transient)

    def find_offers(self, spec: JobSpec) -> list[Offer]:
        r = spec.resources
        count = max(1, r.gpus_per_node)
        wanted = {g.lower() for g in r.gpu or []}
        clouds = ["SECURE", "COMMUNITY"] if r.cloud_type == "ALL" else [r.cloud_type]
        best: dict[str, Offer] = {}
        for cloud in clouds:
            for t in self.api(self.client.gpu_types, count, cloud):
                if wanted and t["id"].lower() not in wanted and str(t.get("name", "")).lower() not in wanted:
                    continue
                key = cloud.lower()
                if (not t.get(key) or t.get("availability", "NONE") == "NONE"
                        or (t.get("maxCount") or {}).get(key, 0) < count):
                    continue  # not in this cloud, none in stock, or not that many GPUs on one machine
                usd = float(t["price"][key]) * count
                if not usd or (r.max_usd_per_hour and usd > r.max_usd_per_hour):
                    continue
                offer = Offer(t["id"], usd, f"{count}× {t['id']} ({key} cloud, ${usd:.3f}/hr)", extra=cloud)
                if t["id"] not in best or usd < best[t["id"]].usd_per_hour:
                    best[t["id"]] = offer
        return sorted(best.values(), key=lambda o: o.usd_per_hour)

    def create(self, offer: Offer, spec: JobSpec, label: str) -> str:
        r = spec.resources
        body: dict[str, Any] = {"name": label, "image": r.image, "cloud": offer.extra,
                                "gpu": {"id": offer.id, "count": max(1, r.gpus_per_node)},
                                "disk": max(1, math.ceil(r.disk_gb)), "ports": ["22/tcp"], "startSsh": True}
        if self.public_key:
            body["env"] = {"PUBLIC_KEY": self.public_key}
        if not r.image.startswith("runpod/"):  # RunPod's own images start sshd from PUBLIC_KEY themselves
            body["args"] = SSHD_BOOTSTRAP
        pod = self.client.create_pod(body)
        if not isinstance(pod, dict) or not pod.get("id"):
            raise KeyError(f"create answered no pod id: {str(pod)[:200]}")
        return str(pod["id"])

    def create_retryable(self, error: BaseException) -> bool:
        """429 and 5xx are (the same offer again, once nothing leaked); 400 (no capacity, or a
        rule), 402, 403 and 422 are not: the next offer is tried instead (the create operation's
        own table of failures)."""
        return self.is_transient(error)

    def list_instances(self) -> list[Instance]:
        return [_instance(p) for p in self.client.list_pods() if p.get("status") in LIVE]

    def destroy_call(self, iid: str) -> None:
        self.client.delete_pod(iid)
