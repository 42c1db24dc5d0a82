"""Backend ``vastai``: rent the cheapest fitting Vast.ai offer, run over SSH, destroy it.

Uses the official SDK (``vastai.VastAI``; endpoints and fields: ../shared/notes/providers.md).
An attempt's lifecycle, each step an action row: cheapest offer that fits (GPU names,
GPUs, $/hr cap, reliability) -> create, labelled ``orchd-<job>-a<n>`` (a create that fails
after allocating is destroyed at once) -> wait for SSH with a deadline (else destroy, next
offer) -> upload the workdir (tar over SFTP) -> start the command detached, output to a log,
exit status to a file -> read the log over SFTP from its offset -> when the attempt ends,
download ``artifacts``, destroy the instance and confirm it is gone.

Host keys: trust on first use per instance (kept in ``$ORCHD_HOME/known_hosts/vast-<id>``),
never a silently accepted change. Launch is synchronous in this version: the tick waits for
SSH and the upload (bounded by ``ssh_timeout``).
"""

from __future__ import annotations

import io
import logging
import shlex
import tarfile
import time
from fnmatch import fnmatch
from pathlib import Path

import paramiko
import requests
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from orchestrator.backends.base import Backend, Observation, SubmitRequest
from orchestrator.clusters import VastAI as VastConfig
from orchestrator.config import api_key
from orchestrator.errors import BackendError
from orchestrator.spec import JobSpec
from orchestrator.states import JobState

log = logging.getLogger("orchd.vastai")
REMOTE_ROOT = "orchd"  # under the login user's home on the instance


def _api_error(e: Exception) -> BackendError:
    body = getattr(getattr(e, "response", None), "text", "") or ""
    return BackendError(f"vastai: {type(e).__name__}: {str(e)[:200]} {body[:200]}".strip())


api_retry = retry(retry=retry_if_exception_type(requests.RequestException), stop=stop_after_attempt(4),
                  wait=wait_exponential(multiplier=0.2, max=3), reraise=True)


class VastBackend(Backend):
    """Attempts on Vast.ai instances. Backend ids are ``<instance id>@<run name>``."""

    name = "vastai"

    def __init__(self, cfg: VastConfig, state_dir: Path):
        from vastai import VastAI  # imported here: the SDK is only needed by vastai jobs

        self.cfg = cfg
        self.client = VastAI(api_key=api_key(cfg.api_key_env), server_url=cfg.server_url.rstrip("/"))
        self.hosts_dir = state_dir / "known_hosts"
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.prices: dict[str, float] = {}  # backend id -> $/hr of the offer taken
        self.billed_since: dict[str, float] = {}  # backend id -> when its instance was created
        self._ssh: dict[int, paramiko.SSHClient] = {}
        self._homes: dict[int, str] = {}

    # ------------------------------------------------------------------ provider calls

    @api_retry
    def _search(self, spec: JobSpec) -> list[dict]:
        r = spec.resources
        q = [f"num_gpus={max(1, r.gpus_per_node)}"]
        if r.max_usd_per_hour:
            q.append(f"dph_total<={r.max_usd_per_hour}")
        if r.min_reliability is not None:
            q.append(f"reliability>={r.min_reliability}")
        offers = self.client.search_offers(query=" ".join(q), order="dph_total", storage=r.disk_gb)
        wanted = {g.replace("_", " ") for g in r.gpu or []}
        return sorted((o for o in offers if not wanted or o["gpu_name"] in wanted), key=lambda o: o["dph_total"])

    def _create(self, offer: dict, spec: JobSpec, label: str) -> int:
        """Create once: not retried here, since a create is not idempotent (the SDK itself retries
        429/502/503/504, which come before anything is allocated). A create that fails after
        allocating is cleaned up: the id in the error body (dstack does the same), and anything
        carrying this attempt's label."""
        try:
            r = self.client.create_instance(offer["id"], image=spec.resources.image, disk=spec.resources.disk_gb,
                                            label=label, ssh=True, direct=True)
            return int(r["new_contract"])
        except requests.RequestException as e:
            leaked = None
            try:
                leaked = (e.response.json() or {}).get("new_contract") if e.response is not None else None
            except ValueError:
                pass
            if leaked:
                self._destroy(int(leaked))
            self._destroy_labelled(label)
            raise _api_error(e) from None

    def _destroy_labelled(self, label: str) -> None:
        try:
            for row in self._list():
                if row.get("label") == label:
                    self._destroy(int(row["id"]))
        except requests.RequestException as e:
            log.warning("could not list instances to clean up %s (reconcile will): %s", label, e)

    @api_retry
    def _show(self, iid: int) -> dict | None:
        return self.client.show_instance(iid)

    @api_retry
    def _list(self) -> list[dict]:
        return self.client.show_instances()

    def _destroy(self, iid: int) -> float:
        """Destroy and confirm it is gone (idempotent). Returns when billing stopped: the time the
        destroy call was answered (now, if it was gone already)."""
        client = self._ssh.pop(iid, None)
        self._homes.pop(iid, None)
        if client:
            client.close()
        stopped = time.time()
        for _ in range(5):
            try:
                if self._show(iid) is None:
                    return stopped
                self.client.destroy_instance(iid)
                stopped = time.time()
            except requests.RequestException as e:
                log.warning("destroy %s: %s (retrying)", iid, e)
            time.sleep(0.2)
        if self._show(iid) is not None:
            raise BackendError(f"vastai: instance {iid} still exists after destroy")
        return stopped

    # ------------------------------------------------------------------ SSH

    def _connect(self, iid: int, row: dict) -> paramiko.SSHClient:
        if iid in self._ssh and self._ssh[iid].get_transport() and self._ssh[iid].get_transport().is_active():
            return self._ssh[iid]
        host = row.get("ssh_host") or row.get("public_ipaddr")
        port = int(row.get("ssh_port") or row["ports"]["22/tcp"][0]["HostPort"])
        known = self.hosts_dir / f"vast-{iid}"
        client = paramiko.SSHClient()
        if known.exists():
            client.load_host_keys(str(known))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())  # a changed key is refused
        else:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # first use of this instance
        try:
            client.connect(host, port=port, username=self.cfg.ssh_user, timeout=5, banner_timeout=5,
                           auth_timeout=5, key_filename=str(Path(self.cfg.ssh_key).expanduser()),
                           look_for_keys=False, allow_agent=False)
        except paramiko.BadHostKeyException as e:
            raise BackendError(f"vastai: instance {iid} host key CHANGED: {e}") from None
        except (OSError, paramiko.SSHException) as e:
            raise BackendError(f"vastai: ssh to instance {iid} ({host}:{port}): {e}") from None
        if not known.exists():
            client.save_host_keys(str(known))
        self._ssh[iid] = client
        return client

    def _client(self, iid: int, row: dict | None = None) -> paramiko.SSHClient:
        """The open SSH connection to an instance; asks the API for its address only to (re)connect."""
        client = self._ssh.get(iid)
        if client is not None and client.get_transport() is not None and client.get_transport().is_active():
            return client
        row = row or self._show(iid)
        if row is None:
            raise BackendError(f"vastai: instance {iid} is gone")
        return self._connect(iid, row)

    def _exec(self, iid: int, cmd: str, row: dict | None = None) -> tuple[int, str]:
        try:
            _, out, err = self._client(iid, row).exec_command(cmd, timeout=60)
            text = out.read().decode(errors="replace") + err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), text
        except (OSError, paramiko.SSHException, requests.RequestException) as e:
            self._ssh.pop(iid, None)
            raise BackendError(f"vastai: ssh to instance {iid}: {e}") from None

    def _run_dir(self, iid: int, run: str) -> str:
        """Absolute path of an attempt's directory on its instance: ``$HOME/orchd/<run name>``."""
        if iid not in self._homes:
            code, out = self._exec(iid, 'printf %s "$HOME"')
            if code or not out.startswith("/"):
                raise BackendError(f"vastai: no home directory on instance {iid}: {out[-200:]}")
            self._homes[iid] = out
        return f"{self._homes[iid]}/{REMOTE_ROOT}/{run}"

    def _wait_ssh(self, iid: int) -> None:
        deadline = time.time() + self.cfg.ssh_timeout
        last = "no answer"
        while time.time() < deadline:
            try:
                row = self._show(iid)
            except requests.RequestException as e:
                last = str(e)
                row = None
            if row and row.get("actual_status") == "running":
                try:
                    self._connect(iid, row)
                    return
                except BackendError as e:
                    last = str(e)
            time.sleep(0.5)
        raise BackendError(f"vastai: instance {iid} gave no SSH within {self.cfg.ssh_timeout:.0f}s ({last})")

    def _upload(self, iid: int, spec: JobSpec, run_dir: str) -> None:
        buf = io.BytesIO()
        root = Path(spec.workdir)

        def keep(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
            parts = Path(ti.name).parts
            return None if any(fnmatch(p, x) for p in parts for x in spec.sync_exclude) else ti

        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(root, arcname="code", filter=keep)
        self._exec(iid, f"mkdir -p {run_dir}")
        sftp = self._ssh[iid].open_sftp()
        with sftp.open(f"{run_dir}/code.tgz", "wb") as f:
            f.write(buf.getvalue())
        sftp.close()
        code, out = self._exec(iid, f"cd {run_dir} && tar xzf code.tgz && rm code.tgz")
        if code:
            raise BackendError(f"vastai: unpacking the code on instance {iid}: {out[-300:]}")

    # ------------------------------------------------------------------ Backend

    def submit(self, req: SubmitRequest) -> str:
        offers = self._search(req.spec)
        if not offers:
            raise BackendError(f"vastai: NO_CAPACITY: no offer fits {req.spec.resources.gpu or 'any GPU'}, "
                               f"{req.spec.resources.max_usd_per_hour or 'any'} $/hr")
        errors = []
        for offer in offers[: self.cfg.max_offers_tried]:
            created = time.time()
            iid = self._create(offer, req.spec, req.run_name)
            try:
                self._wait_ssh(iid)
                run_dir = self._run_dir(iid, req.run_name)
                self._upload(iid, req.spec, run_dir)
                env = {**req.spec.env, "ORCHD_JOB_ID": str(req.job_id), "ORCHD_ATTEMPT": str(req.attempt),
                       "ORCHD_JOB_DIR": f"{run_dir}/job", "ORCHD_RUN_NAME": req.run_name, "PYTHONUNBUFFERED": "1"}
                exports = " ".join(f"export {k}={shlex.quote(v)};" for k, v in env.items())
                inner = f"{exports} cd {shlex.quote(run_dir)}/code && bash -c {shlex.quote(req.spec.command)}"
                # detached, with every stream redirected: the SSH channel closes at once
                code, out = self._exec(iid, "setsid nohup bash -c "
                                            f"{shlex.quote(inner + ' > ../output.log 2>&1; echo $? > ../exit_code')}"
                                            " > /dev/null 2>&1 < /dev/null &")
                if code:
                    raise BackendError(f"vastai: starting the command on {iid}: {out[-300:]}")
            except (BackendError, requests.RequestException) as e:
                errors.append(f"offer {offer['id']}: {e}")
                self._destroy(iid)  # never leave a half-started instance billing
                continue
            backend_id = f"{iid}@{req.run_name}"
            self.prices[backend_id] = float(offer["dph_total"])
            self.billed_since[backend_id] = created
            return backend_id
        raise BackendError("vastai: no instance came up: " + "; ".join(errors))

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        return self.prices.get(backend_id or "")

    def poll(self, ids: list[str]) -> dict[str, Observation]:
        try:
            alive = {int(r["id"]): r for r in self._list()}
        except requests.RequestException as e:
            raise _api_error(e) from None
        out = {}
        for backend_id in ids:
            iid, run = int(backend_id.split("@")[0]), backend_id.split("@")[1]
            if iid not in alive:
                out[backend_id] = Observation(JobState.FAILED, None, "BACKEND_LOST: the instance is gone")
                continue
            try:
                self._client(iid, alive[iid])  # the listing has its address: no extra API call
                code, text = self._exec(iid, f"cat {self._run_dir(iid, run)}/exit_code 2>/dev/null")
            except BackendError:
                continue  # no news this tick
            if code == 0 and text.strip().lstrip("-").isdigit():
                rc = int(text.strip())
                out[backend_id] = Observation(JobState.COMPLETED if rc == 0 else JobState.FAILED, rc)
            else:
                out[backend_id] = Observation(JobState.RUNNING)
        return out

    def read_log(self, backend_id: str, offset: int, max_bytes: int) -> bytes:
        iid, run = int(backend_id.split("@")[0]), backend_id.split("@")[1]
        try:
            path = f"{self._run_dir(iid, run)}/output.log"
            sftp = self._client(iid).open_sftp()
            try:
                with sftp.open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(max_bytes)
            finally:
                sftp.close()
        except FileNotFoundError:
            return b""
        except (OSError, paramiko.SSHException, requests.RequestException) as e:
            self._ssh.pop(iid, None)  # reconnect next tick; the offset is unchanged
            raise BackendError(f"vastai: reading the log on {iid}: {e}") from None
        except BackendError:
            return b""  # the instance is gone: its end is the poll's business

    def release(self, backend_id: str, artifacts: list[str], local_dir: Path) -> tuple[list[str], float]:
        """Download ``artifacts`` (paths relative to the job's remote ``job`` dir, or to the
        code dir) into ``local_dir``, then destroy the instance. Returns (what was downloaded,
        when billing stopped)."""
        iid, run = int(backend_id.split("@")[0]), backend_id.split("@")[1]
        got = []
        try:
            row = self._show(iid)
            if row is not None and artifacts:
                run_dir = self._run_dir(iid, run)
                sftp = self._client(iid, row).open_sftp()
                local_dir.mkdir(parents=True, exist_ok=True)
                for a in artifacts:
                    for base in (f"{run_dir}/job", f"{run_dir}/code"):
                        try:
                            sftp.get(f"{base}/{a}", str(local_dir / Path(a).name))
                            got.append(a)
                            break
                        except OSError:
                            continue
                sftp.close()
        except (BackendError, OSError, paramiko.SSHException, requests.RequestException) as e:
            log.warning("artifacts of %s: %s", backend_id, e)
        return got, self._destroy(iid)

    def cancel(self, backend_id: str) -> None:
        self._destroy(int(backend_id.split("@")[0]))

    def reconcile(self, live: set[str]) -> list[int]:
        """Destroy instances labelled ``orchd-*`` that no live attempt owns; returns their ids."""
        owned = {int(b.split("@")[0]) for b in live}
        orphans = [int(r["id"]) for r in self._list()
                   if str(r.get("label") or "").startswith("orchd-") and int(r["id"]) not in owned]
        for iid in orphans:
            self._destroy(iid)
        return orphans
