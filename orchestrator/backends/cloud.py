"""Rented GPU instances run over SSH: what the ``vastai`` and ``runpod`` backends share.

A provider adapter (``vastai.py``, ``runpod.py``: small clients of their HTTP APIs) says how to find
offers and how to create, list and destroy an instance. This module does the rest of
an attempt's lifecycle, each step reported to the tick, which records it as an action:

cheapest fitting offer -> create, labelled ``orchd-<job>-a<n>`` (a create that fails must
leave nothing behind) -> SSH within ``ssh_timeout`` (else destroy it, try the next offer) ->
upload the workdir (tar over SFTP) -> start the command detached, output to ``output.log``,
exit status to ``exit_code`` -> poll (one provider list per tick + one SSH exec per attempt)
and read the log over SFTP from the stored offset -> when the attempt ends, download
``artifacts``, destroy the instance and confirm it is gone -> on every daemon start and
``orchd poll``, reconcile the provider's list with the database.

The launch (rent, SSH, upload, start) runs in a worker thread per attempt, so a tick never
waits for an instance to boot: the attempt is PENDING ("LAUNCHING: <phase>") and billed from
its first create until a poll finds its log. A lock file per attempt
(``$ORCHD_HOME/launching/<label>``, ``flock``) tells other orchd processes (``orchd poll``
from cron next to the daemon) that it is being launched; an attempt found rented but never
started with nobody launching it (orchd was killed mid-launch) is destroyed and failed.
Process exit waits for running launches (``concurrent.futures`` joins its workers).

Host keys: trust on first use per instance (``$ORCHD_HOME/known_hosts/<provider>-<id>``); a
changed key is refused, never silently accepted.
"""

from __future__ import annotations

import fcntl
import io
import logging
import math
import os
import shlex
import tarfile
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from orchestrator import leases, uploads
from orchestrator.backends.base import NO_LEASES, Backend, LogShrunk, Observation, SubmitRequest
from orchestrator.backends.remote import HostKeyChanged, RemoteHost
from orchestrator.clusters import CloudAccount
from orchestrator.errors import BackendError
from orchestrator.shellsafe import UnsafeValue, export_line
from orchestrator.spec import JobSpec
from orchestrator.states import JobState
from orchestrator.transfers import transfer_progress

log = logging.getLogger("orchd.cloud")
REMOTE_ROOT = "orchd"  # under the login user's home on the instance
TIMED_OUT = 124  # GNU timeout's exit status when the time limit ran out (coreutils manual, "timeout invocation")


class InstanceGone(BackendError):
    """The provider no longer has the instance."""


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
    the provider reports it running, else None; ``usd_per_hour`` as billed, when known;
    ``fatal`` why it can never come up, when the provider says so."""

    id: str
    label: str
    address: tuple[str, int] | None
    usd_per_hour: float | None = None
    fatal: str | None = None  # the provider says it will never run (image failed, exited, error)


class CloudBackend(Backend):
    """Attempts on rented instances. A backend id is the attempt's label (``orchd-<job>-a<n>``),
    which is also its instance's label at the provider.

    Subclasses set ``name`` and ``api_errors`` (every exception their client raises), say which
    are worth retrying (``is_transient``: rate limits, 5xx, connection errors) and implement the
    four provider hooks below. Calls go through ``api()`` (retried); a create is sent again only
    once nothing it may have allocated is left (``_rent``)."""

    name = "cloud"
    # True where the provider bills the instance's price only once it runs (Vast: GPU time from
    # `running`, not while the image loads; storage, a few cents a month per GB, from creation is
    # not counted); else from the create's answer
    bills_from_running = False
    reports_every_change = False  # see Backend: the tick keeps its liveness
    api_errors: tuple[type[BaseException], ...] = (OSError,)
    transient: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, cfg: CloudAccount, state_dir: Path):
        self.cfg = cfg
        self.no_news_timeout = cfg.no_news_timeout  # see Backend: enforced by the tick
        self.time_limit_grace = cfg.time_limit_grace
        # an instance rented by a launcher that died must boot and answer SSH within what that
        # launcher would have waited, or it never will
        self.launch_timeout = cfg.boot_timeout + cfg.ssh_timeout
        self.state_dir = state_dir  # $ORCHD_HOME: never uploaded
        self.hosts_dir = state_dir / "known_hosts"
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.launch_dir = state_dir / "launching"  # a lock file per attempt being launched
        self.launch_dir.mkdir(parents=True, exist_ok=True)
        # writes an attempt's launch lease to the database (leases.write, set by the App): None
        # where there is no database to tell (then only this home's processes know of a launch)
        self.lease_writer: Callable[[str, float | None], None] | None = None
        self.logs_dir = state_dir / "cloud-logs"  # a local copy of each attempt's log
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.prices: dict[str, float] = {}  # attempt label -> $/hr as billed
        self._launches: dict[str, Launch] = {}  # attempt label -> its launch in this process
        self._held: dict[str, ExitStack] = {}  # attempt label -> its launch lock, taken before the intent's commit
        self._iids: dict[str, str] = {}  # attempt label -> instance id
        self._hosts: dict[str, RemoteHost] = {}  # instance id -> its SSH host (connection kept open)
        self._homes: dict[str, str] = {}  # instance id -> $HOME there
        self._list_lock = threading.Lock()  # one provider listing at a time, shared by every thread
        self._listed: tuple[float, list[Instance]] | None = None  # (when it was asked for, the listing)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_parallel_launches,
                                        thread_name_prefix=f"orchd-{self.name}-launch")

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
        return self.is_transient(error)

    @abstractmethod
    def list_instances(self) -> list[Instance]:
        """Every instance of the account that still exists (or bills)."""

    @abstractmethod
    def destroy_call(self, iid: str) -> None:
        """Ask the provider to destroy ``iid``."""

    # ------------------------------------------------------------------ provider calls

    def is_transient(self, error: BaseException) -> bool:
        """Whether a call that failed with ``error`` is worth another try (rate limit, 5xx, network)."""
        return isinstance(error, self.transient)

    def api(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried on transient errors (4 tries, backoff 0.2-3 s, or the
        error's ``retry_after`` seconds, capped at 30, when the provider said how long)."""
        backoff = wait_exponential(multiplier=0.2, max=3)

        def wait(state: RetryCallState) -> float:
            told = getattr(state.outcome.exception() if state.outcome else None, "retry_after", None)
            return min(float(told), 30.0) if told else backoff(state)

        for attempt in Retrying(retry=retry_if_exception(self.is_transient), stop=stop_after_attempt(4), wait=wait,
                                reraise=True):
            with attempt:
                return fn(*args, **kwargs)
        raise AssertionError("unreachable")

    def error(self, e: BaseException, doing: str) -> BackendError:
        """A provider error as a BackendError naming the provider and the step (never the API key:
        the SDKs' messages do not carry it)."""
        body = getattr(getattr(e, "response", None), "text", "") or ""
        return BackendError(f"{self.name}: {doing}: {type(e).__name__}: {str(e)[:200]} {body[:200]}".strip())

    def _listing(self, newer_than: float | None = None) -> list[Instance]:
        """The provider's list of instances, asked for no earlier than ``newer_than`` (epoch s;
        default now: a fresh one). Threads share it: launches waiting for SSH and destroys waiting
        for a confirmation read one listing a second, not one call each (Vast allows one list a
        second and one show per 2 s). Raises ``api_errors``."""
        return self._dated_listing(newer_than)[1]

    def _dated_listing(self, newer_than: float | None = None) -> tuple[float, list[Instance]]:
        """``_listing`` with the time it was asked for (epoch s): what it shows held then or later."""
        newer_than = time.time() if newer_than is None else newer_than
        with self._list_lock:
            if self._listed is not None and self._listed[0] >= newer_than:
                return self._listed
            asked = time.time()
            self._listed = (asked, self.api(self.list_instances))
            return self._listed

    def destroy(self, iid: str) -> float:
        """Destroy and confirm it is gone (idempotent). Returns when billing stopped (epoch s).
        Raises BackendError if it is still listed ``destroy_timeout`` seconds later."""
        return self.destroy_many([iid])[iid]

    def destroy_many(self, ids: list[str]) -> dict[str, float]:
        """Destroy instances and confirm each is gone: no longer in a listing asked for after its
        destroy was answered (providers delete eventually: an instance may be listed for a while
        after). Returns, per id, when its billing stopped (epoch s): the destroy's answer, or the
        confirmation if the provider refused every destroy. The destroy is sent again every 15 s
        while the instance is listed. Raises BackendError naming the ones still listed after
        ``destroy_timeout`` seconds."""
        for iid in ids:
            host = self._hosts.pop(iid, None)
            self._homes.pop(iid, None)
            if host:
                host.close()
        deadline = time.time() + self.cfg.destroy_timeout
        stopped: dict[str, float] = {}
        sent: dict[str, float] = {}
        out: dict[str, float] = {}
        last = "no answer"
        while True:
            for iid in ids:
                if iid not in out and time.time() - sent.get(iid, 0.0) >= 15.0:
                    try:
                        self.api(self.destroy_call, iid)
                        stopped.setdefault(iid, time.time())
                    except self.api_errors as e:
                        last = f"{type(e).__name__}: {str(e)[:200]}"
                        log.warning("%s: destroy %s: %s (asking again)", self.name, iid, last)
                    sent[iid] = time.time()
            waiting = [i for i in ids if i not in out]
            try:
                listed = {i.id for i in self._listing()}  # asked after every destroy sent so far
                for iid in waiting:
                    if iid not in listed:
                        out[iid] = stopped.get(iid, time.time())
            except self.api_errors as e:
                last = f"listing: {type(e).__name__}: {str(e)[:200]}"
            if len(out) == len(ids):
                return out
            if time.time() > deadline:
                left = ", ".join(i for i in ids if i not in out)
                raise BackendError(f"{self.name}: instance(s) {left} still listed {self.cfg.destroy_timeout:.0f}s "
                                   f"after destroy ({last})")
            time.sleep(1.0)

    def destroy_labelled(self, label: str) -> bool:
        """Destroy every instance labelled ``label`` (cleanup after a failed create). Returns True
        once none is left, False if that could not be confirmed (reconcile will finish it)."""
        try:
            ids = [inst.id for inst in self._listing() if inst.label == label]
            if ids:
                self.destroy_many(ids)
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

    def _connect(self, inst: Instance) -> RemoteHost:
        """A fresh connection to ``inst`` at the address the provider gives now. Raises
        BackendError (HostKeyChanged: refused, nothing sent)."""
        if inst.address is None:
            raise BackendError(f"{self.name}: instance {inst.id} has no SSH address yet")
        old = self._hosts.pop(inst.id, None)
        if old is not None:
            old.close()
        host = RemoteHost(*inst.address, self.cfg.ssh_user, self.cfg.ssh_key,
                          self.hosts_dir / f"{self.name}-{inst.id}", trust_first_use=True, connect_timeout=5.0)
        try:
            host.connect()
        except BackendError as e:
            raise type(e)(f"{self.name}: instance {inst.id}: {e}") from None
        self._hosts[inst.id] = host
        return host

    def _host(self, iid: str, inst: Instance | None = None) -> RemoteHost:
        """The instance's SSH host, connected; asks the provider for its address only to (re)connect."""
        host = self._hosts.get(iid)
        if host is not None:
            try:
                host.connect()  # reconnects at the same address if the connection dropped
                return host
            except HostKeyChanged as e:
                raise HostKeyChanged(f"{self.name}: instance {iid}: {e}") from None
            except BackendError:
                pass  # the address may have changed: ask the provider
        try:  # the listing has every instance's SSH address (Vast's show may not): at most a second old
            inst = inst or next((i for i in self._listing(newer_than=time.time() - 1.0) if i.id == iid), None)
        except self.api_errors as e:
            raise self.error(e, f"looking up instance {iid}") from None
        if inst is None:
            raise InstanceGone(f"{self.name}: instance {iid} is gone")
        return self._connect(inst)

    def _exec(self, iid: str, cmd: str) -> tuple[int, str]:
        """(exit status, stdout + stderr) of ``cmd`` on the instance. Raises BackendError."""
        code, out, err = self._host(iid).exec(cmd)
        return code, out + err

    def _run_dir(self, iid: str, run: str) -> str:
        """Absolute path of an attempt's directory on its instance: ``$HOME/orchd/<run name>``."""
        if iid not in self._homes:
            code, out = self._exec(iid, 'printf %s "$HOME"')
            if code or not out.startswith("/"):
                raise BackendError(f"{self.name}: no home directory on instance {iid}: {out[-200:]}")
            self._homes[iid] = out
        return f"{self._homes[iid]}/{REMOTE_ROOT}/{run}"

    def _wait_ssh(self, iid: str, launch: Launch, created: float) -> Instance:
        """Wait until the instance answers SSH; returns it as the provider last showed it. Two
        deadlines: ``boot_timeout`` while the provider still boots it (image pull), then
        ``ssh_timeout`` from when it reports the instance running. Raises BackendError at either,
        at once when the provider says the instance can never run, or once the launch is cancelled."""
        boot_deadline = time.time() + self.cfg.boot_timeout
        ssh_deadline: float | None = None
        last = "no answer"
        not_running = created  # the latest moment the provider was seen not running it yet
        while True:
            now = time.time()
            if ssh_deadline is None and now > boot_deadline:
                raise BackendError(f"{self.name}: instance {iid} did not boot within {self.cfg.boot_timeout:.0f}s "
                                   f"({last})")
            if ssh_deadline is not None and now > ssh_deadline:
                raise BackendError(f"{self.name}: instance {iid} gave no SSH within {self.cfg.ssh_timeout:.0f}s "
                                   f"of running ({last})")
            if launch.is_cancelled():
                raise BackendError(f"{self.name}: cancelled while waiting for SSH on instance {iid}")
            asked = created
            try:  # a listing at most a second old (and not older than the create): one call a second for all
                asked, listing = self._dated_listing(newer_than=max(created, time.time() - 1.0))
                inst = next((i for i in listing if i.id == iid), None)
            except self.api_errors as e:
                last, inst = str(e)[:200], None
            if inst is not None and inst.fatal:
                raise BackendError(f"{self.name}: instance {iid} will not run: {inst.fatal}")
            if inst is not None and inst.address is not None:
                ssh_deadline = ssh_deadline or time.time() + self.cfg.ssh_timeout
                # it started running after it was last seen loading: billed from then (an over-count of
                # at most the time between two looks, never an under-count)
                launch.running_since = launch.running_since or not_running
                if self.bills_from_running:
                    launch.started_at = launch.started_at or launch.running_since
                try:
                    self._connect(inst)
                    return inst
                except BackendError as e:
                    last = str(e)
            else:
                last = "booting" if inst is not None else "not listed yet"
                not_running = max(not_running, asked) if inst is not None else not_running
            launch.cancelled.wait(1.0)

    def _upload(self, iid: str, spec: JobSpec, run_dir: str) -> int:
        """Tar the files ``uploads.plan`` sends (the workdir or its ``sync`` paths, never secrets,
        ``$ORCHD_HOME``, ``sync_exclude`` or oversized files), send it, unpack it as
        ``<run_dir>/code``. Returns the bytes sent."""
        buf = io.BytesIO()
        sending = uploads.plan(spec, self.state_dir)
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for rel, _ in sending.files:
                try:
                    tar.add(sending.root / rel, arcname=str(Path("code") / rel), recursive=False)
                except FileNotFoundError:  # removed since the plan (a live workdir): nothing to send
                    log.info("%s: %s vanished before the upload; not sent", self.name, rel)
        size = buf.tell()
        buf.seek(0)
        code, out = self._exec(iid, f"mkdir -p {shlex.quote(run_dir)}/code")  # even when nothing is sent
        if code:
            raise BackendError(f"{self.name}: making {run_dir} on instance {iid}: {out[-300:]}")
        # a failure raises BackendError: the next offer is tried, this instance destroyed
        with transfer_progress(f"upload {spec.name} → {self.name} {iid}", size) as progress:
            self._host(iid).put(buf, f"{run_dir}/code.tgz", size, progress)
        code, out = self._exec(iid, f"cd {shlex.quote(run_dir)} && tar xzf code.tgz && rm code.tgz")
        if code:
            raise BackendError(f"{self.name}: unpacking the code on instance {iid}: {out[-300:]}")
        return size

    def _start_command(self, iid: str, req: SubmitRequest, run_dir: str) -> None:
        env = {**req.spec.env, "ORCHD_JOB_ID": str(req.job_id), "ORCHD_ATTEMPT": str(req.attempt),
               "ORCHD_JOB_DIR": f"{run_dir}/job", "ORCHD_RUN_NAME": req.run_name, "PYTHONUNBUFFERED": "1"}
        try:
            exports = " ".join(export_line(k, v) + ";" for k, v in env.items())
        except UnsafeValue as e:
            raise BackendError(f"{self.name}: refusing to start {req.run_name}: {e}") from None
        limit = req.spec.resources.time_limit
        # time_limit: GNU timeout sends TERM (then KILL 30 s later) and exits 124, read back as TIMEOUT
        run = f"timeout -k 30 {math.ceil(limit)} " if limit else ""
        # ../pid: this shell's pid and start time (/proc/PID/stat field 22, proc(5)), so a poll can
        # tell a run that is still going from one a restarted container lost (the pid may be reused)
        inner = (f"{exports} cd {shlex.quote(run_dir)}/code && echo \"$$ $(cut -d' ' -f22 /proc/$$/stat)\" > ../pid "
                 f"&& {run}bash -c {shlex.quote(req.spec.command)}")
        # detached, every stream redirected: the SSH channel closes at once and the run outlives it
        code, out = self._exec(iid, "setsid nohup bash -c "
                                    f"{shlex.quote(inner + ' > ../output.log 2>&1; echo $? > ../exit_code')}"
                                    " > /dev/null 2>&1 < /dev/null &")
        if code:
            raise BackendError(f"{self.name}: starting the command on instance {iid}: {out[-300:]}")

    # ------------------------------------------------------------------ launch (a worker thread per attempt)

    def hold_launch(self, req: SubmitRequest) -> None:
        """Take the attempt's launch lock, its note the intent's token, before the tick commits
        that intent; ``_launch`` holds it on. Without this, an orchd killed after the commit and
        before its launch thread took the lock left a live lease and no note: the next process
        waited the lease out (two minutes). Raises BackendError if another process holds it."""
        self.drop_launch(req.run_name)  # one left by a tick that failed before its submit: flock would refuse us
        lock = self._take_lock(req)
        if lock is None:
            raise BackendError(f"{self.name}: another orchd process is launching {req.run_name}")
        self._held[req.run_name] = lock

    def _take_lock(self, req: SubmitRequest) -> ExitStack | None:
        """The attempt's launch lock, held (its note the intent's token) until the stack is
        closed; None if another process holds it (see launch_lock)."""
        stack = ExitStack()
        if stack.enter_context(launch_lock(self.launch_dir / req.run_name, note=req.token, wait=PROBE_WAIT)):
            return stack
        stack.close()
        return None

    def drop_launch(self, run_name: str) -> None:
        """Release the lock ``hold_launch`` took for ``run_name``, if it is still held here."""
        stack = self._held.pop(run_name, None)
        if stack is not None:
            stack.close()

    def _launch(self, req: SubmitRequest, launch: Launch) -> None:
        """Rent, wait for SSH, upload, start: the whole launch, off the tick. Holds the attempt's
        launch lock throughout (taken by ``hold_launch`` in the tick, or here) so that no other
        orchd process takes it for an abandoned one."""
        lock = self._held.pop(launch.label, None) or self._take_lock(req)
        if lock is None:
            launch.fail(f"{self.name}: another orchd process is launching {launch.label}")
            return
        with lock:
            over = threading.Event()
            if self.lease_writer is not None:  # for the orchd processes of other homes (hosts) on this database
                leases.hold(self.lease_writer, launch.label, over)
            try:
                self._rent_and_start(req, launch)
                launch.finish()
            except Exception as e:  # noqa: BLE001 - whatever it was, the attempt must hear of it
                if not isinstance(e, BackendError):
                    log.exception("%s: launching %s failed unexpectedly", self.name, launch.label)
                if launch.instance:
                    launch.ended_at = self.destroy(launch.instance)
                launch.ended_at = launch.ended_at or time.time()
                if launch.started_at is not None and launch.ended_at > launch.started_at:
                    # the instances tried were billed at their own prices: the attempt's rate is their blend
                    # (set before the failure is told: a tick reads the price as soon as it hears of it)
                    self.prices[launch.label] = launch.usd * 3600 / (launch.ended_at - launch.started_at)
                launch.fail(str(e) if isinstance(e, BackendError) else f"{self.name}: {type(e).__name__}: {e}")
            finally:
                over.set()

    def _rent_and_start(self, req: SubmitRequest, launch: Launch) -> None:
        r = req.spec.resources
        try:
            offers = self.find_offers(req.spec)
        except self.api_errors as e:
            raise self.error(e, "searching offers") from None
        if not offers:
            raise BackendError(f"{self.name}: NO_CAPACITY: no offer fits {r.gpu or 'any GPU'} × {r.gpus_per_node}, "
                               f"{r.max_usd_per_hour or 'any'} $/hr")
        errors = []
        for offer in offers[: self.cfg.max_offers_tried]:
            if launch.is_cancelled():
                raise BackendError(f"{self.name}: cancelled while launching")
            launch.phase = f"renting {offer.describe}"
            try:
                iid = self._rent(offer, req.spec, req.run_name)
            except BackendError as e:
                errors.append(str(e))
                continue
            created = time.time()  # billed from the create's answer (or, see bills_from_running, from running)
            launch.instance, launch.running_since = iid, None
            if not self.bills_from_running:
                launch.started_at = launch.started_at or created
            self._iids[launch.label] = iid
            self.prices[launch.label] = offer.usd_per_hour
            launch.step(f"rented {offer.describe} as instance {iid}")
            try:
                launch.phase = f"waiting for SSH on instance {iid} ({offer.describe})"
                inst = self._wait_ssh(iid, launch, created)
                self.prices[launch.label] = inst.usd_per_hour or offer.usd_per_hour  # as billed, when the provider says
                launch.step(f"ssh up {time.time() - created:.1f}s after the create")
                run_dir = self._run_dir(iid, req.run_name)
                launch.phase = f"uploading to instance {iid}"
                t0 = time.time()
                size = self._upload(iid, req.spec, run_dir)
                launch.step(f"uploaded {size / 1e6:.2f} MB in {time.time() - t0:.1f}s")
                if launch.is_cancelled():
                    raise BackendError(f"{self.name}: cancelled while launching")
                self._start_command(iid, req, run_dir)
                return
            except BackendError as e:
                if launch.is_cancelled():
                    raise
                errors.append(f"{offer.describe}: {e}")
                launch.ended_at = self.destroy(iid)  # never leave a half-started instance billing
                launch.instance = None
                billed_from = launch.running_since if self.bills_from_running else created
                if billed_from is not None:
                    launch.usd += offer.usd_per_hour * max(0.0, launch.ended_at - billed_from) / 3600
                    launch.started_at = launch.started_at or billed_from
        raise BackendError(f"{self.name}: no instance came up: " + "; ".join(errors))

    # ------------------------------------------------------------------ Backend

    starts_immediately = False  # PENDING (LAUNCHING: ...) until the command runs; billed from the create
    leases_launches = True

    def submit(self, req: SubmitRequest) -> str:
        """Start launching in a worker thread and return at once; the backend id is the attempt's
        label (``orchd-<job>-a<n>``), which names its instance at the provider. How the launch
        goes is told by ``poll`` (PENDING with the phase, then RUNNING, or FAILED with
        ``launch_failed``) and ``launch_steps``."""
        launch = Launch(req.run_name, cancel_marker=self.launch_dir / f"{req.run_name}.cancelled")
        self._launches[req.run_name] = launch
        self._pool.submit(self._launch, req, launch)
        return req.run_name

    def find(self, req: SubmitRequest) -> str | None:
        """The attempt's label if it is being launched (here or by another orchd process), if its
        launch for this intent (``req.token``) began in this home, or if an instance carries it.
        Raises BackendError when the provider cannot be asked."""
        label = req.run_name
        lock = self.launch_dir / label
        if label in self._launches or launch_locked(lock):
            return label
        if req.token and _read_note(lock) == req.token:
            # this very intent's launch began in this home and its process died (the lock is free)
            # before the id was recorded: poll tells what it left (an instance, or nothing: a launch
            # interrupted), as for any recorded launch. Its lease would keep it waiting two minutes.
            return label
        try:
            instances = self._listing()
        except self.api_errors as e:
            raise self.error(e, "listing instances") from None
        return label if any(i.label == label for i in instances) else None

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        """The attempt's $/hr as billed (known once its instance is rented), else None. Without an
        attempt: the most ``spec`` may cost, its ``max_usd_per_hour`` (what budgets project)."""
        if backend_id is None:
            return spec.resources.max_usd_per_hour
        return self.prices.get(_label(backend_id))

    def launch_steps(self, backend_id: str) -> list[str]:
        launch = self._launches.get(_label(backend_id))
        return launch.take_steps() if launch else []

    def poll(self, ids: list[str], leased: Mapping[str, str] = NO_LEASES) -> dict[str, Observation]:
        """One provider list for all ids, then one SSH exec per started attempt (exit code, or
        whether its log exists). ``leased``: ids whose launch another orchd process vouches for
        (a live lease in the database): never taken for abandoned."""
        out, rest = {}, []
        for backend_id in ids:  # what this process's launches know needs no provider call
            launch = self._launches.get(_label(backend_id))
            if launch is not None and not launch.done:
                out[backend_id] = Observation(JobState.PENDING, None, f"LAUNCHING: {launch.phase}",
                                              started_at=launch.started_at)
            elif launch is not None and launch.error:
                out[backend_id] = Observation(JobState.FAILED, None, launch.error, ended_at=launch.ended_at,
                                              started_at=launch.started_at, launch_failed=True)
            else:
                rest.append(backend_id)
        if not rest:
            return out
        try:
            by_label: dict[str, Instance] = {i.label: i for i in self._listing()}
        except self.api_errors as e:
            if out:
                log.warning("%s: listing instances: %s (no news of %d attempt(s))", self.name, e, len(rest))
                return out
            raise self.error(e, "listing instances") from None
        fresh: set[str] | None = None  # labels of a second listing, taken only if one seems gone
        for backend_id in rest:
            label = _label(backend_id)
            launch = self._launches.get(label)
            inst = by_label.get(label)
            if inst is None:
                if self._launching_elsewhere(label, leased):
                    out[backend_id] = Observation(JobState.PENDING, None, "LAUNCHING in another orchd process")
                    continue
                # the listing may predate a launch another process finished (and unlocked) since: ask again
                if fresh is None:
                    try:
                        fresh = {i.label for i in self._listing()}
                    except self.api_errors:
                        fresh = {_label(b) for b in rest}  # cannot tell: no news rather than a false loss
                if label not in fresh:  # destroyed behind orchd's back: NODE_FAIL, so a retry can resume it
                    out[backend_id] = Observation(JobState.NODE_FAIL, None, "BACKEND_LOST: the instance is gone",
                                                  lost=True, gone=True)
                continue  # it exists after all: news next tick
            self._iids[label] = inst.id
            if inst.fatal and not (launch is not None and not launch.done):
                # the provider says it stopped (exited, error, offline): what ran there is lost; NODE_FAIL
                # lets `retry.on: [NODE_FAIL]` resume it on a new instance
                out[backend_id] = Observation(JobState.NODE_FAIL, None, f"BACKEND_LOST: {inst.fatal}",
                                              usd_per_hour=inst.usd_per_hour or self.prices.get(label), lost=True)
                continue
            try:
                self._host(inst.id, inst)  # the listing has its address: no extra API call to reconnect
                code, text = self._exec(inst.id, _STATUS.format(run=shlex.quote(self._run_dir(inst.id, label))))
            except HostKeyChanged as e:
                # a container the provider restarted or replaced comes back with new host keys: what ran
                # there is lost, and nothing more is sent to a host that may not be the instance
                out[backend_id] = Observation(JobState.NODE_FAIL, None, f"BACKEND_LOST: {e}", lost=True,
                                              usd_per_hour=inst.usd_per_hour or self.prices.get(label))
                continue
            except BackendError:
                if launch is None and self._launching_elsewhere(label, leased):  # still booting for another
                    out[backend_id] = Observation(JobState.PENDING, None, "LAUNCHING in another orchd process",
                                                  usd_per_hour=inst.usd_per_hour)  # process: bills already
                elif launch is None:  # (for an attempt that runs: no news; the tick knows which it is)
                    out[backend_id] = Observation(
                        JobState.PENDING, None, "LAUNCH INTERRUPTED: the orchd process renting it stopped; "
                        "waiting for the instance to answer SSH", usd_per_hour=inst.usd_per_hour, orphaned=True)
                continue  # no news this tick
            text = text.strip()
            started = launch.started_at if launch else None
            price = inst.usd_per_hour or self.prices.get(label)  # as the provider bills it: known in every process
            if code == 0 and text.lstrip("-").isdigit():
                rc = int(text)
                state = JobState.COMPLETED if rc == 0 else JobState.TIMEOUT if rc == TIMED_OUT else JobState.FAILED
                out[backend_id] = Observation(state, rc, started_at=started, usd_per_hour=price)
            elif code == 0 and text == "RUNNING":
                out[backend_id] = Observation(JobState.RUNNING, started_at=started, usd_per_hour=price)
            elif code == 0 and text == "LOST":  # its log is there, its process is not, and it wrote no exit code
                out[backend_id] = Observation(JobState.NODE_FAIL, None, "BACKEND_LOST: the run's process is gone "
                                              "without an exit code (the instance restarted)", usd_per_hour=price)
            elif self._launching_elsewhere(label, leased):
                out[backend_id] = Observation(JobState.PENDING, None, "LAUNCHING in another orchd process",
                                              usd_per_hour=price)
            elif launch is not None and launch.finished_at and time.time() - launch.finished_at < STARTING_SECONDS:
                pass  # started by this process a moment ago: its shell has not made output.log yet (no news)
            else:  # rented, never started, and nobody is launching it: orchd stopped mid-launch
                out[backend_id] = Observation(JobState.FAILED, None, "launch interrupted (orchd stopped before "
                                              "the command started)", ended_at=self.destroy(inst.id),
                                              launch_failed=True, relaunch=True, usd_per_hour=price)
        return out

    def _launching_elsewhere(self, label: str, leased: Mapping[str, str]) -> bool:
        """Whether another orchd process launches ``label``: its lock file in this home is held
        (the kernel frees it when the launcher dies), or its lease in the database lives
        (orchestrator/leases.py) and is not that of a launcher of this home that died: a lock file
        free and naming the leased intent (``leased`` maps ids to intent tokens). A lock file that
        names another intent is an older launch's, from before another home took the attempt
        over: that home's lease decides."""
        path = self.launch_dir / label
        if launch_locked(path):
            return True
        token = leased.get(label)
        return token is not None and _read_note(path) != token

    def _instance_of(self, label: str) -> str | None:
        if label not in self._iids:
            try:
                for inst in self._listing():
                    if inst.label == label:
                        self._iids[label] = inst.id
            except self.api_errors as e:
                raise self.error(e, "listing instances") from None
        return self._iids.get(label)

    def read_log(self, backend_id: str, offset: int, max_bytes: int) -> bytes:
        """Bytes of the attempt's log from ``offset``: what the local mirror
        (``$ORCHD_HOME/cloud-logs/<label>.log``) already has, then the remote ``output.log`` over
        SFTP, whose new bytes are appended to the mirror when they continue it (so the log
        outlives the instance). b"" while launching. A
        dropped connection raises BackendError unless the mirror had bytes (the offset stays;
        the next tick reconnects)."""
        label = _label(backend_id)
        mirror = self.logs_dir / f"{label}.log"
        size = mirror.stat().st_size if mirror.exists() else 0
        local = b""
        if offset < size:
            with open(mirror, "rb") as f:
                f.seek(offset)
                local = f.read(max_bytes)
            if len(local) == max_bytes:
                return local
        start = offset + len(local)
        try:
            remote = self._read_remote_log(label, start, max_bytes - len(local))
        except BackendError:
            if local:
                return local
            raise
        if remote and start == size:
            with open(os.open(mirror, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # another process (orchd logs -f) may append the same bytes
                if f.seek(0, os.SEEK_END) == start:  # only at its end: the mirror never has holes or twins
                    f.write(remote)
        return local + remote

    def _read_remote_log(self, label: str, offset: int, max_bytes: int) -> bytes:
        launch = self._launches.get(label)
        if launch is not None and (not launch.done or launch.error) or (iid := self._instance_of(label)) is None:
            return b""  # nothing started (yet)
        try:
            return self._host(iid).read(f"{self._run_dir(iid, label)}/output.log", offset, max_bytes)
        except InstanceGone:
            return b""  # how the attempt ended is the poll's news
        except LogShrunk as e:
            # the local mirror holds what was read; a remote log that shrank under it is not followed
            log.warning("%s: the log of %s on %s shrank to %d bytes; orchd keeps what it read", self.name,
                        label, iid, e.size)
            return b""

    def release(self, backend_id: str, artifacts: list[str], local_dir: Path) -> tuple[list[str], float]:
        """Download ``artifacts`` (paths relative to the remote job dir, else to the code dir) into
        ``local_dir``, then destroy the instance. Returns (what was downloaded, when billing
        stopped, epoch s). A failed download is logged, never a reason to keep the instance; an
        attempt still launching is cancelled and whatever it rented destroyed."""
        label = _label(backend_id)
        launch = self._launches.get(label)
        if launch is not None and not launch.done or launch is None and launch_locked(self.launch_dir / label):
            # still launching, here or in another orchd process: stop it from renting more, and
            # destroy what it has (it destroys what it is creating right now itself)
            if launch is not None:
                launch.cancelled.set()
            (self.launch_dir / f"{label}.cancelled").touch()
            self.destroy_labelled(label)
            return [], time.time()
        iid = self._instance_of(label)
        if iid is None:
            self._forget(label)
            return [], time.time()
        got = []
        try:
            if artifacts:
                run_dir = self._run_dir(iid, label)
                host = self._host(iid)
                local_dir.mkdir(parents=True, exist_ok=True)
                for a in artifacts:
                    for base in (f"{run_dir}/job", f"{run_dir}/code"):
                        size = host.size(f"{base}/{a}")
                        if size is not None:
                            with transfer_progress(f"download {a} ← {self.name} {iid}", size) as progress:
                                host.get(f"{base}/{a}", local_dir / Path(a).name, progress)
                            got.append(a)
                            break
        except BackendError as e:
            log.warning("artifacts of %s: %s", backend_id, e)
        stopped = self.destroy(iid)
        # a create whose answer was lost and was sent again may have left a twin with this label
        self.destroy_labelled(label)
        self._forget(label)
        return got, stopped

    def _forget(self, label: str) -> None:
        """Drop what this process kept about an attempt that is over (a daemon lives for months)."""
        self._launches.pop(label, None)
        self._iids.pop(label, None)
        self.prices.pop(label, None)
        for f in (self.launch_dir / label, self.launch_dir / f"{label}.cancelled"):
            f.unlink(missing_ok=True)

    def cancel(self, backend_id: str) -> None:
        self.release(backend_id, [], Path())  # no artifacts: the directory is never used

    def reconcile(self, live: set[str]) -> list[str]:
        """Destroy instances labelled ``orchd-*`` that no live attempt owns and nobody is launching
        (returns their ids); the ones live attempts own are adopted: polled as usual. Instances
        with other labels are not orchd's and are left alone."""
        owned = {_label(b) for b in live}
        try:
            instances = self._listing()
        except self.api_errors as e:
            raise self.error(e, "listing instances") from None
        orphans = [i.id for i in instances if i.label.startswith("orchd-") and i.label not in owned
                   and not launch_locked(self.launch_dir / i.label)]
        if orphans:
            self.destroy_many(orphans)
        return orphans


# What became of a run, in one SSH exec: its exit code; RUNNING while the process that started it
# (pid and start time in ./pid) lives; LOST when the log is there but that process is gone with no
# exit code (the container restarted); nothing when it never started. The exit code is read again
# after the process check: the run may end between the two.
_STATUS = """cd {run} 2>/dev/null || exit 0
if [ -e exit_code ]; then cat exit_code; exit 0; fi
test -e output.log || exit 0
read p t < pid 2>/dev/null
if [ -z "$p" ] || [ "$(cut -d' ' -f22 /proc/$p/stat 2>/dev/null)" = "$t" ]; then echo RUNNING
elif [ -e exit_code ]; then cat exit_code
else echo LOST; fi"""


STARTING_SECONDS = 60.0  # a command started in the background shows its output.log within this


def _label(backend_id: str) -> str:
    """The attempt label in a backend id (``orchd-3-a1``; ids of older versions were ``<id>@<label>``)."""
    return backend_id.rsplit("@", 1)[-1]


@dataclass
class Launch:
    """One attempt's launch in this process. Written by its worker thread, read by the tick."""

    label: str
    cancel_marker: Path  # created by whoever cancels the attempt (maybe another process)
    phase: str = "looking for offers"
    instance: str | None = None
    started_at: float | None = None  # billing started (epoch s): the first create's answer, or running
    running_since: float | None = None  # when the provider first said the current instance runs
    ended_at: float | None = None  # billing stopped after a failed launch (epoch s)
    error: str | None = None
    usd: float = 0.0  # what the instances given up so far were billed, USD
    done: bool = False
    finished_at: float | None = None  # when its command was started (epoch s)
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps: deque[str] = field(default_factory=deque)

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set() or self.cancel_marker.exists()

    def step(self, text: str) -> None:
        self.steps.append(text)

    def take_steps(self) -> list[str]:
        out = []
        while self.steps:
            out.append(self.steps.popleft())
        return out

    def finish(self) -> None:
        self.phase, self.done, self.finished_at = "started", True, time.time()

    def fail(self, error: str) -> None:
        self.error, self.phase, self.done = error, "failed", True
        self.ended_at = self.ended_at or time.time()


PROBE_WAIT = 1.0  # seconds a launcher retries a held lock: ``launch_locked`` holds it for an instant


@contextmanager
def launch_lock(path: Path, note: str = "", wait: float = 0.0) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` while launching; yields False if another process
    (or thread) holds it, still after ``wait`` seconds of retries (a launcher waits out another
    process's ``launch_locked`` probe, which takes the lock for an instant; a real launcher holds
    it for minutes). ``note`` (the attempt's intent token) replaces the file's text once the
    lock is held: it outlives the holder (see ``find``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.02)
        if note:
            f.truncate(0)
            f.write(note)
            f.flush()
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_note(path: Path) -> str | None:
    """The note a launch lock file keeps (its last holder's intent token), None without one."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def launch_locked(path: Path) -> bool:
    """Whether some orchd process is launching the attempt whose lock file is ``path``."""
    if not path.exists():
        return False
    with launch_lock(path) as free:
        return not free
