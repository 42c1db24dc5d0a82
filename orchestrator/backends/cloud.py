"""Rented GPU instances run over SSH: what the ``vastai`` and ``runpod`` backends share.

A provider adapter (``vastai.py``, ``runpod.py``) says, through its official SDK, how to find
offers and how to create, show, list and destroy an instance. This module does the rest of
an attempt's lifecycle, each step reported to the tick, which records it as an action:

cheapest fitting offer -> create, labelled ``orchd-<job>-a<n>`` (a create that fails must
leave nothing behind) -> SSH within ``ssh_timeout`` (else destroy it, try the next offer) ->
upload the workdir (tar over SFTP) -> start the command detached, output to ``output.log``,
exit status to ``exit_code`` -> poll (one provider list per tick + one SSH exec per attempt)
and read the log over SFTP from the stored offset -> when the attempt ends, download
``artifacts``, destroy the instance and confirm it is gone -> on every daemon start and
``orchd poll``, reconcile the provider's list with the database.

Host keys: trust on first use per instance (``$ORCHD_HOME/known_hosts/<provider>-<id>``); a
changed key is refused, never silently accepted. Launch is synchronous in this version: the
tick waits for SSH and the upload, bounded by ``ssh_timeout``.
"""

from __future__ import annotations

import io
import logging
import shlex
import tarfile
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import paramiko
import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from orchestrator.backends.base import Backend, Observation, SubmitRequest
from orchestrator.clusters import CloudAccount
from orchestrator.errors import BackendError
from orchestrator.progress import transfer_progress
from orchestrator.spec import JobSpec
from orchestrator.states import JobState

log = logging.getLogger("orchd.cloud")
REMOTE_ROOT = "orchd"  # under the login user's home on the instance


@dataclass(frozen=True)
class Offer:
    """One way to rent what a spec asks for: ``id`` is the provider's offer (Vast) or GPU type
    (RunPod); ``usd_per_hour`` the price of the whole instance, USD/hr."""

    id: str
    usd_per_hour: float
    describe: str
    extra: Any = None  # what the adapter needs to create from it


@dataclass(frozen=True)
class Instance:
    """What the provider says of one instance. ``address`` is (host, port) of its SSH server once
    the provider reports it running, else None; ``usd_per_hour`` as billed, when known."""

    id: str
    label: str
    address: tuple[str, int] | None
    usd_per_hour: float | None = None


class CloudBackend(Backend):
    """Attempts on rented instances. Backend ids are ``<instance id>@<run name>``.

    Subclasses set ``name``, ``api_errors`` (every exception their SDK raises) and ``transient``
    (the ones worth retrying: rate limits, 5xx, connection errors) and implement the five
    provider hooks below. Reads go through ``api()`` (retried); a create is never retried."""

    name = "cloud"
    api_errors: tuple[type[BaseException], ...] = (requests.RequestException,)
    transient: tuple[type[BaseException], ...] = (requests.RequestException,)

    def __init__(self, cfg: CloudAccount, state_dir: Path):
        self.cfg = cfg
        self.hosts_dir = state_dir / "known_hosts"
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.prices: dict[str, float] = {}  # backend id -> $/hr at launch
        self.billed_since: dict[str, float] = {}  # backend id -> when its create was sent (epoch s)
        self.steps: dict[str, list[str]] = {}  # backend id -> what launching it did, for the job's events
        self._ssh: dict[str, paramiko.SSHClient] = {}
        self._homes: dict[str, str] = {}

    # ------------------------------------------------------------------ provider hooks

    @abstractmethod
    def find_offers(self, spec: JobSpec) -> list[Offer]:
        """Offers that fit the spec's resources, cheapest first. Raises ``api_errors``."""

    @abstractmethod
    def create(self, offer: Offer, spec: JobSpec, label: str) -> str:
        """Create one instance labelled ``label``; return its id. Raises ``api_errors``; the caller
        cleans up after a failure (``allocated_in`` and the label) before any new try."""

    def allocated_in(self, error: BaseException) -> str | None:
        """The id of an instance a failed create allocated anyway, if the error says so."""
        return None

    def create_retryable(self, error: BaseException) -> bool:
        """Whether a create that failed with ``error`` may be sent again (once nothing leaked)."""
        return isinstance(error, self.transient)

    @abstractmethod
    def show(self, iid: str) -> Instance | None:
        """One instance, or None if it does not exist (any more)."""

    @abstractmethod
    def list_instances(self) -> list[Instance]:
        """Every instance of the account that still exists (or bills)."""

    @abstractmethod
    def destroy_call(self, iid: str) -> None:
        """Ask the provider to destroy ``iid``."""

    # ------------------------------------------------------------------ provider calls

    def api(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried on ``transient`` errors (4 tries, backoff 0.2-3 s)."""
        for attempt in Retrying(retry=retry_if_exception_type(self.transient), stop=stop_after_attempt(4),
                                wait=wait_exponential(multiplier=0.2, max=3), reraise=True):
            with attempt:
                return fn(*args, **kwargs)
        raise AssertionError("unreachable")

    def error(self, e: BaseException, doing: str) -> BackendError:
        """A provider error as a BackendError naming the provider and the step (never the API key:
        the SDKs' messages do not carry it)."""
        body = getattr(getattr(e, "response", None), "text", "") or ""
        return BackendError(f"{self.name}: {doing}: {type(e).__name__}: {str(e)[:200]} {body[:200]}".strip())

    def destroy(self, iid: str) -> float:
        """Destroy and confirm it is gone (idempotent). Returns when billing stopped (epoch s): the
        time the destroy call was answered, or now if it was gone already. Raises BackendError if
        it still exists after 5 tries."""
        client = self._ssh.pop(iid, None)
        self._homes.pop(iid, None)
        if client:
            client.close()
        stopped = time.time()
        for _ in range(5):
            try:
                if self.api(self.show, iid) is None:
                    return stopped
                self.destroy_call(iid)
                stopped = time.time()
            except self.api_errors as e:
                log.warning("%s: destroy %s: %s (retrying)", self.name, iid, e)
            time.sleep(0.2)
        try:
            gone = self.api(self.show, iid) is None
        except self.api_errors as e:
            raise self.error(e, f"confirming instance {iid} is destroyed") from None
        if not gone:
            raise BackendError(f"{self.name}: instance {iid} still exists after destroy")
        return stopped

    def destroy_labelled(self, label: str) -> bool:
        """Destroy every instance labelled ``label`` (cleanup after a failed create). Returns True
        once none is left, False if that could not be confirmed (reconcile will finish it)."""
        try:
            for inst in self.api(self.list_instances):
                if inst.label == label:
                    self.destroy(inst.id)
            return True
        except (BackendError, *self.api_errors) as e:
            log.warning("%s: could not list instances to clean up %s (reconcile will): %s", self.name, label, e)
            return False

    def _rent(self, offer: Offer, spec: JobSpec, label: str) -> str:
        """``create`` with cleanup: a failed create's allocation (if the error names one) and
        anything labelled ``label`` are destroyed; a transient failure is sent again (3 tries)
        only once nothing is left, so a retry never doubles an instance. Raises BackendError."""
        for n in range(3):
            try:
                return self.create(offer, spec, label)
            except self.api_errors as e:
                if leaked := self.allocated_in(e):
                    self.destroy(leaked)
                clean = self.destroy_labelled(label)
                if n == 2 or not clean or not self.create_retryable(e):
                    raise self.error(e, f"creating from {offer.describe}") from None
                log.info("%s: create from %s failed (%s); nothing left behind, trying again", self.name,
                         offer.describe, e)
                time.sleep(0.5 * 2**n)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ SSH

    def _connect(self, inst: Instance) -> paramiko.SSHClient:
        if inst.address is None:
            raise BackendError(f"{self.name}: instance {inst.id} has no SSH address yet")
        host, port = inst.address
        known = self.hosts_dir / f"{self.name}-{inst.id}"
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
            raise BackendError(f"{self.name}: instance {inst.id} host key CHANGED: {e}") from None
        except (OSError, paramiko.SSHException) as e:
            raise BackendError(f"{self.name}: ssh to instance {inst.id} ({host}:{port}): {e}") from None
        if not known.exists():
            client.save_host_keys(str(known))
        self._ssh[inst.id] = client
        return client

    def _client(self, iid: str, inst: Instance | None = None) -> paramiko.SSHClient:
        """The open SSH connection to an instance; asks the provider for its address only to (re)connect."""
        client = self._ssh.get(iid)
        if client is not None and client.get_transport() is not None and client.get_transport().is_active():
            return client
        try:
            inst = inst or self.api(self.show, iid)
        except self.api_errors as e:
            raise self.error(e, f"looking up instance {iid}") from None
        if inst is None:
            raise BackendError(f"{self.name}: instance {iid} is gone")
        return self._connect(inst)

    def _exec(self, iid: str, cmd: str, inst: Instance | None = None) -> tuple[int, str]:
        try:
            _, out, err = self._client(iid, inst).exec_command(cmd, timeout=60)
            text = out.read().decode(errors="replace") + err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), text
        except (OSError, paramiko.SSHException) as e:
            self._ssh.pop(iid, None)
            raise BackendError(f"{self.name}: ssh to instance {iid}: {e}") from None

    def _run_dir(self, iid: str, run: str) -> str:
        """Absolute path of an attempt's directory on its instance: ``$HOME/orchd/<run name>``."""
        if iid not in self._homes:
            code, out = self._exec(iid, 'printf %s "$HOME"')
            if code or not out.startswith("/"):
                raise BackendError(f"{self.name}: no home directory on instance {iid}: {out[-200:]}")
            self._homes[iid] = out
        return f"{self._homes[iid]}/{REMOTE_ROOT}/{run}"

    def _wait_ssh(self, iid: str) -> Instance:
        """Wait until the instance answers SSH; returns it as the provider last showed it. Raises
        BackendError after ``ssh_timeout``."""
        deadline = time.time() + self.cfg.ssh_timeout
        last = "no answer"
        while time.time() < deadline:
            try:
                inst = self.api(self.show, iid)
            except self.api_errors as e:
                last, inst = str(e)[:200], None
            if inst is not None and inst.address is not None:
                try:
                    self._connect(inst)
                    return inst
                except BackendError as e:
                    last = str(e)
            time.sleep(0.5)
        raise BackendError(f"{self.name}: instance {iid} gave no SSH within {self.cfg.ssh_timeout:.0f}s ({last})")

    def _upload(self, iid: str, spec: JobSpec, run_dir: str) -> int:
        """Tar the workdir (or its ``sync`` paths) minus ``sync_exclude``, send it, unpack it as
        ``<run_dir>/code``. Returns the bytes sent."""
        buf = io.BytesIO()
        root = Path(spec.workdir)

        def keep(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
            parts = Path(ti.name).parts
            return None if any(fnmatch(p, x) for p in parts for x in spec.sync_exclude) else ti

        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for rel in spec.sync or ["."]:
                tar.add(root / rel, arcname=str(Path("code") / rel), filter=keep)
        size = buf.tell()
        buf.seek(0)
        self._exec(iid, f"mkdir -p {shlex.quote(run_dir)}")
        sftp = self._client(iid).open_sftp()
        try:
            with transfer_progress(f"upload {spec.name} → {self.name} {iid}", size) as progress:
                sftp.putfo(buf, f"{run_dir}/code.tgz", file_size=size, callback=progress)
        finally:
            sftp.close()
        code, out = self._exec(iid, f"cd {shlex.quote(run_dir)} && tar xzf code.tgz && rm code.tgz")
        if code:
            raise BackendError(f"{self.name}: unpacking the code on instance {iid}: {out[-300:]}")
        return size

    def _start_command(self, iid: str, req: SubmitRequest, run_dir: str) -> None:
        env = {**req.spec.env, "ORCHD_JOB_ID": str(req.job_id), "ORCHD_ATTEMPT": str(req.attempt),
               "ORCHD_JOB_DIR": f"{run_dir}/job", "ORCHD_RUN_NAME": req.run_name, "PYTHONUNBUFFERED": "1"}
        exports = " ".join(f"export {k}={shlex.quote(v)};" for k, v in env.items())
        inner = f"{exports} cd {shlex.quote(run_dir)}/code && bash -c {shlex.quote(req.spec.command)}"
        # detached, every stream redirected: the SSH channel closes at once and the run outlives it
        code, out = self._exec(iid, "setsid nohup bash -c "
                                    f"{shlex.quote(inner + ' > ../output.log 2>&1; echo $? > ../exit_code')}"
                                    " > /dev/null 2>&1 < /dev/null &")
        if code:
            raise BackendError(f"{self.name}: starting the command on instance {iid}: {out[-300:]}")

    # ------------------------------------------------------------------ Backend

    def submit(self, req: SubmitRequest) -> str:
        """Rent, upload, start (see the module docstring). Tries up to ``max_offers_tried`` offers;
        raises BackendError (NO_CAPACITY when nothing fits) with every offer's error."""
        try:
            offers = self.find_offers(req.spec)
        except self.api_errors as e:
            raise self.error(e, "looking for offers") from None
        r = req.spec.resources
        if not offers:
            raise BackendError(f"{self.name}: NO_CAPACITY: no offer fits {r.gpu or 'any GPU'} × {r.gpus_per_node}, "
                               f"{r.max_usd_per_hour or 'any'} $/hr")
        errors = []
        for offer in offers[: self.cfg.max_offers_tried]:
            created = time.time()
            try:
                iid = self._rent(offer, req.spec, req.run_name)
            except BackendError as e:
                errors.append(str(e))
                continue
            steps = [f"rented {offer.describe} as instance {iid}"]
            try:
                inst = self._wait_ssh(iid)
                steps.append(f"ssh up {time.time() - created:.1f}s after the create")
                run_dir = self._run_dir(iid, req.run_name)
                t0 = time.time()
                size = self._upload(iid, req.spec, run_dir)
                steps.append(f"uploaded {size / 1e6:.2f} MB in {time.time() - t0:.1f}s")
                self._start_command(iid, req, run_dir)
            except BackendError as e:
                errors.append(f"{offer.describe}: {e}")
                self.destroy(iid)  # never leave a half-started instance billing
                continue
            backend_id = f"{iid}@{req.run_name}"
            self.prices[backend_id] = inst.usd_per_hour or offer.usd_per_hour  # as billed, when the provider says
            self.billed_since[backend_id] = created
            self.steps[backend_id] = steps
            return backend_id
        raise BackendError(f"{self.name}: no instance came up: " + "; ".join(errors))

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        return self.prices.get(backend_id or "")

    def launch_steps(self, backend_id: str) -> list[str]:
        return self.steps.pop(backend_id, [])

    def poll(self, ids: list[str]) -> dict[str, Observation]:
        """One provider list for all ids, then one SSH exec per attempt for its exit code."""
        try:
            alive = {i.id: i for i in self.api(self.list_instances)}
        except self.api_errors as e:
            raise self.error(e, "listing instances") from None
        out = {}
        for backend_id in ids:
            iid, run = backend_id.split("@", 1)
            if iid not in alive:
                out[backend_id] = Observation(JobState.FAILED, None, "BACKEND_LOST: the instance is gone")
                continue
            try:
                self._client(iid, alive[iid])  # the listing has its address: no extra API call to reconnect
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
        """Bytes of the remote ``output.log`` from ``offset`` over SFTP. A dropped connection
        raises BackendError (the offset stays, the next tick reconnects)."""
        iid, run = backend_id.split("@", 1)
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
        except (OSError, paramiko.SSHException) as e:
            self._ssh.pop(iid, None)
            raise BackendError(f"{self.name}: reading the log on {iid}: {e}") from None

    def release(self, backend_id: str, artifacts: list[str], local_dir: Path) -> tuple[list[str], float]:
        """Download ``artifacts`` (paths relative to the remote job dir, else to the code dir) into
        ``local_dir``, then destroy the instance. Returns (what was downloaded, when billing
        stopped, epoch s). A failed download is logged, never a reason to keep the instance."""
        iid, run = backend_id.split("@", 1)
        got = []
        try:
            if artifacts:
                run_dir = self._run_dir(iid, run)
                sftp = self._client(iid).open_sftp()
                local_dir.mkdir(parents=True, exist_ok=True)
                for a in artifacts:
                    for base in (f"{run_dir}/job", f"{run_dir}/code"):
                        try:
                            size = sftp.stat(f"{base}/{a}").st_size or 0
                            with transfer_progress(f"download {a} ← {self.name} {iid}", size) as progress:
                                sftp.get(f"{base}/{a}", str(local_dir / Path(a).name), callback=progress)
                            got.append(a)
                            break
                        except OSError:
                            continue
                sftp.close()
        except (BackendError, OSError, paramiko.SSHException) as e:
            log.warning("artifacts of %s: %s", backend_id, e)
        return got, self.destroy(iid)

    def cancel(self, backend_id: str) -> None:
        self.destroy(backend_id.split("@", 1)[0])

    def reconcile(self, live: set[str]) -> list[str]:
        """Destroy instances labelled ``orchd-*`` that no live attempt owns (returns their ids);
        the ones live attempts own are adopted: polled as usual. Other instances are left alone."""
        owned = {b.split("@", 1)[0] for b in live}
        try:
            instances = self.api(self.list_instances)
        except self.api_errors as e:
            raise self.error(e, "listing instances") from None
        orphans = [i.id for i in instances if i.label.startswith("orchd-") and i.id not in owned]
        for iid in orphans:
            self.destroy(iid)
        return orphans
