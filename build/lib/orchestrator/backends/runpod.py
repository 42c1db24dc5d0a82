"""Backend ``runpod``: RunPod GPU pods through the official SDK (``runpod`` < 1.12, GraphQL).

What the SDK sends and the fields it reads are in ../shared/notes/providers.md (from the
runpod 1.11 source and https://graphql-spec.runpod.io); the lifecycle around these calls is
``cloud.CloudBackend``'s. Pitfalls handled here:

- the base URL is only the env variable ``RUNPOD_API_BASE_URL``, read on every call, and the
  key only the module global ``runpod.api_key``: both set when the backend starts;
- the SDK pastes strings into the query text unescaped: every string orchd passes is escaped
  (``json.dumps(s)[1:-1]``), so a quote in an image name cannot break or alter the query;
- the SDK never retries: reads go through ``CloudBackend.api`` (retried); a failed create is
  followed by terminating any pod carrying its name, and sent again only once none is left.

Offers: one per acceptable GPU type (``resources.gpu``, matched on id or display name; all
types when empty) that the cloud type (``resources.cloud_type``) has, priced per GPU
(``securePrice``, ``communityPrice`` or for ALL ``lowestPrice.uninterruptablePrice``) ×
``gpus_per_node``. The $/hr recorded is the pod's own ``costPerHr`` once it is up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

from orchestrator.backends.cloud import CloudBackend, Instance, Offer
from orchestrator.clusters import RunPod as RunPodConfig
from orchestrator.config import api_key
from orchestrator.spec import JobSpec


def _q(text: str) -> str:
    """``text`` safe to paste between double quotes in a GraphQL query (the SDK does not escape)."""
    return json.dumps(text)[1:-1]


def _instance(pod: dict) -> Instance:
    """A pod as an Instance; SSH is the public ``runtime.ports`` entry for private port 22 (the
    runtime is null until the container is up)."""
    address = None
    if pod.get("desiredStatus") == "RUNNING":
        for p in (pod.get("runtime") or {}).get("ports") or []:
            if p.get("privatePort") == 22 and p.get("isIpPublic") and p.get("ip") and p.get("publicPort"):
                address = (p["ip"], int(p["publicPort"]))
    return Instance(pod["id"], pod.get("name") or "", address, pod.get("costPerHr"))


class RunPodBackend(CloudBackend):
    """Attempts on RunPod pods (ids are pod ids)."""

    name = "runpod"

    def __init__(self, cfg: RunPodConfig, state_dir: Path):
        import runpod  # here: importing it costs ~2 s and only runpod jobs need it

        super().__init__(cfg, state_dir)
        self.sdk = runpod
        os.environ["RUNPOD_API_BASE_URL"] = cfg.api_url.rstrip("/")  # the SDK's only way to set it
        runpod.api_key = api_key(cfg.api_key_env)
        # a 5xx or a rate limit answers without JSON (requests' JSONDecodeError) or with "errors"
        # (QueryError); both are worth another try for a read. A bad key is not.
        self.api_errors = (requests.RequestException, runpod.error.QueryError, runpod.error.AuthenticationError,
                           ValueError, KeyError, TypeError)
        self.transient = (requests.RequestException, runpod.error.QueryError)
        pub = Path(cfg.ssh_key).expanduser().with_suffix(".pub")
        self.public_key = pub.read_text().strip() if pub.exists() else None

    def find_offers(self, spec: JobSpec) -> list[Offer]:
        r = spec.resources
        count = max(1, r.gpus_per_node)
        types = self.api(self.sdk.get_gpus)
        wanted = {g.lower() for g in r.gpu or []}
        offers = []
        for t in types:
            if wanted and t["id"].lower() not in wanted and (t.get("displayName") or "").lower() not in wanted:
                continue
            try:
                g = self.api(self.sdk.get_gpu, _q(t["id"]), count)
            except ValueError:  # the SDK's "No GPU found" for a type gone since the list
                continue
            per_gpu = {"SECURE": g.get("securePrice") if g.get("secureCloud") else None,
                       "COMMUNITY": g.get("communityPrice") if g.get("communityCloud") else None,
                       "ALL": (g.get("lowestPrice") or {}).get("uninterruptablePrice")}[r.cloud_type]
            if not per_gpu or (g.get("maxGpuCount") or count) < count:
                continue  # none to rent in this cloud, or not that many on one machine
            usd = per_gpu * count
            if r.max_usd_per_hour and usd > r.max_usd_per_hour:
                continue
            offers.append(Offer(t["id"], usd, f"{count}× {t['id']} ({r.cloud_type.lower()} cloud, ${usd:.3f}/hr)"))
        return sorted(offers, key=lambda o: o.usd_per_hour)

    def create(self, offer: Offer, spec: JobSpec, label: str) -> str:
        r = spec.resources
        env = {"PUBLIC_KEY": _q(self.public_key)} if self.public_key else None
        pod = self.sdk.create_pod(name=_q(label), image_name=_q(r.image), gpu_type_id=_q(offer.id),
                                  cloud_type=r.cloud_type, gpu_count=max(1, r.gpus_per_node),
                                  container_disk_in_gb=int(r.disk_gb), support_public_ip=True, start_ssh=True,
                                  ports="22/tcp", env=env)
        if not pod or not pod.get("id"):
            raise KeyError(f"create answered no pod id: {str(pod)[:200]}")
        return str(pod["id"])

    def create_retryable(self, error: BaseException) -> bool:
        """Rate limits and 5xx are; "no longer any instances available" (sold out) is not: the next
        offer is tried instead."""
        return isinstance(error, self.transient) and "no longer any instances" not in str(error)

    def show(self, iid: str) -> Instance | None:
        pod = self.sdk.get_pod(_q(iid))
        return _instance(pod) if pod and pod.get("desiredStatus") != "TERMINATED" else None

    def list_instances(self) -> list[Instance]:
        return [_instance(p) for p in self.sdk.get_pods() if p.get("desiredStatus") != "TERMINATED"]

    def destroy_call(self, iid: str) -> None:
        self.sdk.terminate_pod(_q(iid))
