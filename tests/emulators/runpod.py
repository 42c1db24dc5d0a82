"""A local emulator of RunPod's GraphQL API, for driving the real ``runpod`` SDK in tests.

``POST /graphql`` with ``{"query": ...}``: each query is parsed and executed by graphql-core
against the schema below (the part of https://graphql-spec.runpod.io the SDK's pod calls use:
``gpuTypes``, ``pod``, ``myself { pods }``, ``podFindAndDeployOnDemand``, ``podStop``,
``podTerminate``), so a malformed query (e.g. an unescaped quote) fails as it would upstream
and only the requested fields come back. Errors answer 200 with ``{"errors": [...]}`` as the
real API does; a wrong key answers 401.

Pods are real (``hosts.HostPool``): an sshd per pod reachable at ``runtime.ports`` (private
port 22), authorising the pod's ``PUBLIC_KEY`` env when given, billed per second at the GPU
type's price × GPU count. Faults: ``faults`` (429 / 503 answers, slow answers),
``pool.never_ssh`` (``runtime`` stays null), ``no_capacity`` (GPU type ids whose create errors
as RunPod does when a type is sold out), ``fail_after_alloc`` (a create allocates, then answers
500).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from graphql import build_schema, graphql_sync

from tests.emulators.hosts import Host, ProviderEmulator

API_KEY = "emu-runpod-key"
SOLD_OUT = ("There are no longer any instances available with the requested specifications. "
            "Please refresh and try again.")

SCHEMA = build_schema("""
enum CloudTypeEnum { ALL SECURE COMMUNITY }
enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }

input GpuTypeFilter { id: String }
input GpuLowestPriceInput { gpuCount: Int }
input PodFilter { podId: String! }
input PodStopInput { podId: String! }
input PodTerminateInput { podId: String! }
input EnvironmentVariableInput { key: String! value: String! }
input PodFindAndDeployOnDemandInput {
  name: String, imageName: String, cloudType: CloudTypeEnum, startSsh: Boolean, gpuTypeId: String,
  supportPublicIp: Boolean, gpuCount: Int, volumeInGb: Int, minVcpuCount: Int, minMemoryInGb: Int,
  dataCenterId: String, dockerArgs: String, countryCode: String, containerDiskInGb: Int, ports: String,
  volumeMountPath: String, env: [EnvironmentVariableInput], templateId: String, networkVolumeId: String,
  allowedCudaVersions: [String], minDownload: Int, minUpload: Int
}

type LowestPrice { minimumBidPrice: Float, uninterruptablePrice: Float }
type GpuType {
  id: String!, displayName: String, manufacturer: String, memoryInGb: Int, cudaCores: Int, maxGpuCount: Int,
  secureCloud: Boolean, communityCloud: Boolean, securePrice: Float, communityPrice: Float,
  oneMonthPrice: Float, threeMonthPrice: Float, oneWeekPrice: Float, communitySpotPrice: Float,
  secureSpotPrice: Float, lowestPrice(input: GpuLowestPriceInput): LowestPrice
}
type PodRuntimePorts { ip: String, isIpPublic: Boolean, privatePort: Int, publicPort: Int, type: String }
type PodRuntime { uptimeInSeconds: Int, ports: [PodRuntimePorts] }
type Machine { podHostId: String, gpuDisplayName: String }
type Pod {
  id: String!, name: String, imageName: String, desiredStatus: PodStatus, costPerHr: Float, gpuCount: Int,
  containerDiskInGb: Int, dockerArgs: String, dockerId: String, env: [String], lastStatusChange: String,
  machineId: String, memoryInGb: Float, podType: String, port: Int, ports: String, uptimeSeconds: Int,
  vcpuCount: Float, volumeInGb: Float, volumeMountPath: String, runtime: PodRuntime, machine: Machine
}
type User { id: String, pods: [Pod] }

type Query { gpuTypes(input: GpuTypeFilter): [GpuType], pod(input: PodFilter!): Pod, myself: User }
type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput!): Pod
  podStop(input: PodStopInput!): Pod
  podTerminate(input: PodTerminateInput!): Boolean
}
""")

# per-GPU $/hr; None: not in that cloud
GPU_TYPES = [
    {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24, "maxGpuCount": 8,
     "secureCloud": True, "communityCloud": True, "securePrice": 0.69, "communityPrice": 0.34},
    {"id": "NVIDIA A100 80GB PCIe", "displayName": "A100 PCIe", "memoryInGb": 80, "maxGpuCount": 8,
     "secureCloud": True, "communityCloud": True, "securePrice": 1.64, "communityPrice": 1.19},
    {"id": "NVIDIA RTX A5000", "displayName": "RTX A5000", "memoryInGb": 24, "maxGpuCount": 4,
     "secureCloud": False, "communityCloud": True, "securePrice": None, "communityPrice": 0.16},
]


def _price(gpu: dict, cloud: str) -> float | None:
    """Per-GPU $/hr of ``gpu`` in ``cloud`` (ALL: the cheaper of the two)."""
    prices = {"SECURE": gpu["securePrice"] if gpu["secureCloud"] else None,
              "COMMUNITY": gpu["communityPrice"] if gpu["communityCloud"] else None}
    if cloud != "ALL":
        return prices[cloud]
    return min((p for p in prices.values() if p is not None), default=None)


class QueryFailed(Exception):
    """Raised by a resolver: becomes ``{"errors": [{"message": ...}]}``."""


@dataclass
class RunPodEmulator(ProviderEmulator):
    no_capacity: set[str] = field(default_factory=set)
    fail_after_alloc: bool = False
    queries: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ resolvers

    def _gpu(self, gpu: dict) -> dict:
        def lowest(info, input=None):  # noqa: A002 - the GraphQL argument's name
            n = (input or {}).get("gpuCount") or 1
            p = _price(gpu, "ALL") if n <= gpu["maxGpuCount"] else None
            return {"uninterruptablePrice": p, "minimumBidPrice": round(p * 0.6, 3) if p else None}

        return {**gpu, "manufacturer": "Nvidia", "lowestPrice": lowest}

    def _pod(self, h: Host) -> dict:
        up = h.sshd is not None
        ports = [{"ip": "127.0.0.1", "isIpPublic": True, "privatePort": 22, "publicPort": h.port, "type": "tcp"}]
        return {"id": h.id, "name": h.label, "imageName": h.meta["image"], "desiredStatus": "RUNNING",
                "costPerHr": h.usd_per_hour, "gpuCount": h.meta["gpu_count"], "containerDiskInGb": h.meta["disk"],
                "env": [f"{k}={v}" for k, v in h.meta["env"].items()], "ports": "22/tcp", "podType": "RESERVED",
                "uptimeSeconds": int(time.time() - h.created), "machineId": f"m-{h.id}",
                "lastStatusChange": f"Rented by User: {time.ctime(h.created)}",
                "runtime": {"uptimeInSeconds": int(time.time() - h.created), "ports": ports} if up else None,
                "machine": {"podHostId": f"{h.id}-64410a0f", "gpuDisplayName": h.meta["gpu"]["displayName"]}}

    def _live(self, pod_id: str) -> Host:
        h = self.pool.hosts.get(pod_id)
        if h is None or h.destroyed is not None:
            raise QueryFailed("pod not found")
        return h

    def _deploy(self, info, input):  # noqa: A002
        gpu = next((g for g in GPU_TYPES if g["id"] == input.get("gpuTypeId")), None)
        if gpu is None:
            raise QueryFailed(f"GPU type {input.get('gpuTypeId')!r} does not exist")
        count, cloud = input.get("gpuCount") or 1, input.get("cloudType") or "ALL"
        price = _price(gpu, cloud)
        if gpu["id"] in self.no_capacity or price is None or count > gpu["maxGpuCount"]:
            raise QueryFailed(SOLD_OUT)
        env = {e["key"]: e["value"] for e in input.get("env") or []}
        pod_id = uuid.uuid4().hex[:14]
        h = self.pool.start(pod_id, input.get("name") or "", round(price * count, 4), env.get("PUBLIC_KEY"), gpu=gpu,
                            gpu_count=count, image=input.get("imageName"), disk=input.get("containerDiskInGb"),
                            env=env)
        if self.fail_after_alloc:
            raise RuntimeError("internal error after allocation")
        return self._pod(h)

    def _terminate(self, info, input):  # noqa: A002
        if input["podId"] in self.pool.undying:
            raise QueryFailed("Something went wrong. Please try again later or contact support.")
        self.pool.destroy(self._live(input["podId"]))
        return None

    def root_value(self) -> dict:
        return {
            "gpuTypes": lambda info, input=None: [self._gpu(g) for g in GPU_TYPES  # noqa: A002
                                                  if not (input or {}).get("id") or g["id"] == input["id"]],
            "pod": lambda info, input: (self._pod(h) if (h := self.pool.hosts.get(input["podId"]))  # noqa: A002
                                        and h.destroyed is None else None),
            "myself": lambda info: {"id": "user-1", "pods": [self._pod(h) for h in self.pool.alive()]},
            "podFindAndDeployOnDemand": self._deploy,
            "podStop": lambda info, input: self._pod(self._live(input["podId"])),  # noqa: A002
            "podTerminate": self._terminate,
        }

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        emu = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                text = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/graphql":
                    return self._reply(404, b'{"error": "not found"}')
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self._reply(401, b'{"errors": [{"message": "Unauthorized"}]}')
                if code := emu.faults.status():
                    if code == 429:  # the real API's rate limit answer is not JSON
                        return self._reply(429, b"Too Many Requests", "text/plain")
                    return self._reply(code, json.dumps({"errors": [{"message": f"upstream error {code}"}]}).encode())
                query = json.loads(text)["query"]
                emu.queries.append(query)
                result = graphql_sync(SCHEMA, query, root_value=emu.root_value())
                body: dict = {"data": result.data}
                if result.errors:
                    body["errors"] = [{"message": e.message, "path": e.path} for e in result.errors]
                    if any(isinstance(e.original_error, RuntimeError) for e in result.errors):
                        return self._reply(500, json.dumps(body).encode())
                return self._reply(200, json.dumps(body).encode())

        return Handler
