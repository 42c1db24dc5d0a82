"""Backend ``vastai``: Vast.ai instances through the official SDK (``vastai.VastAI``).

What the SDK calls and the fields it reads are in ../shared/notes/providers.md (from the
vastai 1.9.1 source and https://docs.vast.ai/api); the lifecycle around these calls is
``cloud.CloudBackend``'s. Offers: ``search_offers`` filtered by GPU count, $/hr cap and
reliability, then by the spec's GPU names, cheapest ``dph_total`` first.
"""

from __future__ import annotations

from pathlib import Path

import requests

from orchestrator.backends.cloud import CloudBackend, Instance, Offer
from orchestrator.clusters import VastAI as VastConfig
from orchestrator.config import api_key
from orchestrator.spec import JobSpec


def _instance(row: dict) -> Instance:
    """An SDK instance row as an Instance; SSH is ``ssh_host:ssh_port`` (or the public IP and the
    host port mapped to 22/tcp) once ``actual_status`` is ``running``."""
    address = None
    if row.get("actual_status") == "running":
        host = row.get("ssh_host") or row.get("public_ipaddr")
        port = row.get("ssh_port") or ((row.get("ports") or {}).get("22/tcp") or [{}])[0].get("HostPort")
        if host and port:
            address = (str(host), int(port))
    status, msg = row.get("actual_status"), str(row.get("status_msg") or "")
    fatal = (f"actual_status {status}: {msg[:200]}" if status in ("exited", "offline") or "OCI runtime" in msg
             or "Error response from daemon" in msg else None)
    return Instance(str(row["id"]), str(row.get("label") or ""), address, row.get("dph_total"), fatal)


class VastBackend(CloudBackend):
    """Attempts on Vast.ai instances (ids are Vast's instance ids, as strings)."""

    name = "vastai"
    # the SDK also raises KeyError/TypeError/ValueError on answers it cannot read (a row without
    # start_date, {"instances": {}}): a failed call like any other, never a crash
    api_errors = (requests.RequestException, KeyError, TypeError, ValueError)
    transient = (requests.RequestException,)  # the SDK already retries 429/5xx 3 times; this adds backoff

    def __init__(self, cfg: VastConfig, state_dir: Path):
        from vastai import VastAI  # here: the SDK is only needed by vastai jobs

        super().__init__(cfg, state_dir)
        self.client = VastAI(api_key=api_key(cfg.api_key_env), server_url=cfg.server_url.rstrip("/"))

    def find_offers(self, spec: JobSpec) -> list[Offer]:
        r = spec.resources
        q = [f"num_gpus={max(1, r.gpus_per_node)}"]
        if r.max_usd_per_hour:
            q.append(f"dph_total<={r.max_usd_per_hour}")
        if r.min_reliability is not None:
            q.append(f"reliability>={r.min_reliability}")
        offers = self.api(self.client.search_offers, query=" ".join(q), order="dph_total", storage=r.disk_gb)
        wanted = {g.replace("_", " ") for g in r.gpu or []}
        fitting = sorted((o for o in offers if not wanted or o["gpu_name"] in wanted), key=lambda o: o["dph_total"])
        return [Offer(str(o["id"]), float(o["dph_total"]),
                      f"offer {o['id']} ({o['num_gpus']}× {o['gpu_name']}, ${o['dph_total']:.3f}/hr)") for o in fitting]

    def create(self, offer: Offer, spec: JobSpec, label: str) -> str:
        r = self.client.create_instance(int(offer.id), image=spec.resources.image, disk=spec.resources.disk_gb,
                                        label=label, ssh=True, direct=True)
        return str(r["new_contract"])

    def allocated_in(self, error: BaseException) -> str | None:
        """Vast's create can fail after allocating, with the id in the error body (dstack reads it too)."""
        try:
            body = error.response.json() if getattr(error, "response", None) is not None else None
        except ValueError:
            return None
        leaked = body.get("new_contract") if isinstance(body, dict) else None
        return str(leaked) if leaked else None

    def create_retryable(self, error: BaseException) -> bool:
        return False  # the SDK already retried 429/502/503/504 three times; what is left is not transient

    def show(self, iid: str) -> Instance | None:
        row = self.client.show_instance(int(iid))
        return _instance(row) if row else None

    def list_instances(self) -> list[Instance]:
        return [_instance(r) for r in self.client.show_instances()]

    def destroy_call(self, iid: str) -> None:
        self.client.destroy_instance(int(iid))
