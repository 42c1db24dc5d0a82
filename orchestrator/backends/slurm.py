"""Backend ``slurm``: sbatch jobs on a SLURM cluster, reached locally or over SSH.

Why sbatch and not submitit: submitit submits pickled Python callables, needs the submitting
interpreter's filesystem on the nodes and a local ``sbatch``; orchd submits shell commands,
keeps the exact script with the attempt (``orchd show --script``), and must also work from a
laptop over SSH, where submitit cannot run. One generated script and one code path
(``Shell``: subprocess or paramiko) serve both modes.

Polling is one ``sacct`` call per tick for all of a cluster's live attempts (as submitit does),
plus one ``squeue`` only while some are PENDING (for the reason and expected start) or not yet
in accounting. If
``sacct`` fails (accounting disabled) orchd falls back to ``squeue -t all`` and says so; a
failed poll is "no news". Facts used: sbatch(1) (``--parsable`` prints ``id[;cluster]``),
sacct(1) (``-X -n -P``, states such as ``CANCELLED by 0``, ``ExitCode`` as ``code:signal``),
squeue(1) (``%r`` reason, ``%S`` expected start).
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

from orchestrator.backends.base import NO_LEASES, ArrayBackend, Observation, SubmitRequest
from orchestrator.backends.shell import LocalShell, Shell, SSHShell
from orchestrator.clusters import ClusterProfile
from orchestrator.errors import BackendError
from orchestrator.shellsafe import UnsafeValue, check_env, comment_line, export_line, sbatch_line
from orchestrator.spec import JobSpec
from orchestrator.states import JobState

log = logging.getLogger("orchd.slurm")

# sacct/squeue state -> orchd state (squeue(1) "JOB STATE CODES"); REQUEUED waits in the queue again
STATES = {
    "PENDING": JobState.PENDING, "REQUEUED": JobState.PENDING, "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING, "CONFIGURING": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING,
    "RESIZING": JobState.RUNNING, "STAGE_OUT": JobState.RUNNING, "SIGNALING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED, "FAILED": JobState.FAILED, "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT, "DEADLINE": JobState.TIMEOUT, "PREEMPTED": JobState.PREEMPTED,
    "NODE_FAIL": JobState.NODE_FAIL, "BOOT_FAIL": JobState.NODE_FAIL, "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
    "REVOKED": JobState.CANCELLED, "SPECIAL_EXIT": JobState.FAILED,
}

# squeue(1) "JOB REASON CODES" that mean the job will never start as submitted: orchd fails it
# (and scancels it) instead of letting it wait forever.
NEVER_STARTS = frozenset({
    "BadConstraints", "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidAccount",
    "InvalidQOS", "AccountNotAllowed", "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit",
    "QOSMaxGRESPerJob", "QOSMaxCpuPerJobLimit",
})


def slurm_time(seconds: float) -> str:
    """sbatch ``--time`` as ``D-HH:MM:SS``, rounded up to whole minutes (SLURM's granularity)."""
    minutes = int(-(-seconds // 60))
    d, rem = divmod(minutes, 1440)
    return f"{d}-{rem // 60:02d}:{rem % 60:02d}:00"


def _code_signal(text: str) -> tuple[int, int] | None:
    try:
        c, sig = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return c, sig


def parse_exit(code: str, derived: str = "") -> int | None:
    """sacct ``ExitCode`` and ``DerivedExitCode`` (both ``code:signal``, sacct(1)) -> the exit
    status as a shell reports it: 128+N for a process killed by signal N.

    ``ExitCode`` is the batch script's; ``DerivedExitCode`` the highest of the job's steps. A
    task SIGKILLed under srun (OOM killer) shows as ``ExitCode 9:0`` with ``DerivedExitCode
    137:0`` or ``0:9``: the step's signal wins, so ``retry.on: [exit:137]`` means the same as
    on the local backend. The steps count only when the script itself failed: a requeued job's
    ``DerivedExitCode`` keeps the ``0:15`` of the step its requeue killed, even after the run
    that followed ended with 0."""
    own, steps = _code_signal(code), _code_signal(derived)
    if own is None and steps is None:
        return None
    if own is not None and own[1]:
        return 128 + own[1]
    if own == (0, 0):
        return 0
    if steps is not None and (steps[1] or steps[0] > 128):
        return 128 + steps[1] if steps[1] else steps[0]
    return own[0] if own is not None else None


def parse_state(text: str) -> tuple[JobState | None, str]:
    """``CANCELLED by 0`` -> (CANCELLED, "by 0"); unknown words -> (None, text)."""
    word, _, rest = text.strip().partition(" ")
    return STATES.get(word.rstrip("+")), rest


def _near(submit: str, t: float, window: float = 60.0) -> bool:
    """Whether sacct's ``Submit`` time (local, ``YYYY-MM-DDTHH:MM:SS``) is within ``window`` s of ``t``."""
    try:
        return abs(time.mktime(time.strptime(submit.strip(), "%Y-%m-%dT%H:%M:%S")) - t) <= window
    except ValueError:
        return False


def _rows(out: str, by_slurm: dict[str, str], fields: int) -> Iterator[tuple[str, JobState, str, list[str]]]:
    """(backend id, state, state suffix, fields) of the ``|``-separated sacct/squeue lines that
    name one of our jobs in a state we know."""
    for line in out.splitlines():
        f = line.split("|")
        if len(f) < fields or f[0] not in by_slurm:
            continue
        state, rest = parse_state(f[1])
        if state is not None:
            yield by_slurm[f[0]], state, rest, f


class SlurmBackend(ArrayBackend):
    """One cluster profile. Backend ids are ``<slurm job id>@<log path on the cluster>``. Each
    job carries its attempt's idempotency token as ``--comment`` (see ``find``)."""

    def __init__(self, cluster: str, profile: ClusterProfile, shell: Shell | None = None):
        self.name = f"slurm:{cluster}"
        self.cluster = cluster
        self.profile = profile
        self.shell = shell or (SSHShell(profile.host or "", profile.port, profile.user, profile.key_file,
                                        profile.known_hosts) if profile.mode == "ssh" else LocalShell())
        self.env = {"SLURM_CONF": profile.slurm_conf} if profile.slurm_conf else {}
        self.calls: Counter[str] = Counter()  # commands run, for the closing figures
        self._warned_sacct = False

    starts_immediately = False
    requeues = True  # node failure or preemption with --requeue, `scontrol requeue`: PENDING again, same job id

    # ------------------------------------------------------------------ helpers

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        self.calls[argv[0]] += 1
        return self.shell.run(argv, {**(env or {}), **self.env})

    def _path(self, *parts: str) -> str:
        return str(Path(self.profile.work_dir, *parts))

    def render_script(self, reqs: list[SubmitRequest], log_path: str, throttle: int | None = None) -> str:
        """The sbatch script for one attempt, or for a sweep's first attempts as an array job
        (task i runs ``reqs[i]``). One task per GPU (or per node without GPUs) under srun, with
        the torch.distributed variables set for every task."""
        req = reqs[0]
        spec, prof = req.spec, self.profile
        res = spec.resources
        gpus = res.gpus_per_node or 0
        name = req.run_name if len(reqs) == 1 else f"orchd-{req.job_id}-sweep"
        lines = ["#!/bin/bash", sbatch_line("job-name", name), f"#SBATCH --nodes={int(res.nodes)}",
                 f"#SBATCH --ntasks-per-node={int(gpus or 1)}"]
        if req.token:
            lines.append(sbatch_line("comment", req.token))
        if len(reqs) > 1:
            lines.append(f"#SBATCH --array=0-{len(reqs) - 1}" + (f"%{int(throttle)}" if throttle else ""))
        if gpus:
            lines.append(f"#SBATCH --gpus-per-node={int(gpus)}")
        if cpus := res.cpus_per_task or prof.cpus_per_task:
            lines.append(f"#SBATCH --cpus-per-task={int(cpus)}")
        if res.time_limit:
            lines.append(f"#SBATCH --time={slurm_time(res.time_limit)}")
        if partition := res.partition or prof.partition:
            lines.append(sbatch_line("partition", partition, allow_list=True))
        if account := res.account or prof.account:
            lines.append(sbatch_line("account", account))
        lines += [f"#SBATCH --output={shlex.quote(log_path)}", "#SBATCH --open-mode=append",
                  "#SBATCH --requeue" if prof.requeue else "#SBATCH --no-requeue"]
        lines += [f"#SBATCH {x}" for x in prof.sbatch_extra]  # the cluster's operator wrote these, not a spec
        lines.append(comment_line(f"cluster {self.cluster}: {prof.vendor} GPUs, {gpus} per node for this job "
                                  f"(profile default {prof.gpus_per_node})"))
        lines.append("")
        lines += [f"module load {shlex.quote(m)}" for m in prof.modules]
        lines += [export_line(k, v) for k, v in {**prof.env, "PYTHONUNBUFFERED": "1"}.items()]

        def task(r: SubmitRequest) -> list[str]:
            env = {**r.spec.env, "ORCHD_JOB_ID": str(r.job_id), "ORCHD_ATTEMPT": str(r.attempt),
                   "ORCHD_JOB_DIR": self._path("jobs", str(r.job_id)), "ORCHD_RUN_NAME": r.run_name,
                   "ORCHD_WORKDIR": r.spec.workdir, "ORCHD_COMMAND": r.spec.command}
            return [comment_line(f"orchd job {r.job_id} attempt {r.attempt} ({r.spec.name})")] + \
                [export_line(k, v) for k, v in env.items()]

        if len(reqs) == 1:
            lines += task(req)
        else:
            lines.append('case "$SLURM_ARRAY_TASK_ID" in')
            for i, r in enumerate(reqs):
                lines += [f"  {i})"] + ["    " + x for x in task(r)] + ["    ;;"]
            lines.append("esac")
        lines += [
            # the first node's address as slurmctld knows it (NodeAddr; the node name where unset)
            'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            'export MASTER_ADDR=$(scontrol show node "$first" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
            'export MASTER_ADDR=${MASTER_ADDR:-$first}',
            "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 1000))",
            "export WORLD_SIZE=$SLURM_NTASKS",
            'mkdir -p "$ORCHD_JOB_DIR"',
            'cd "$ORCHD_WORKDIR"',
            'echo "orchd: $SLURM_JOB_ID on $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"',
        ]
        inner = (prof.container + " " if prof.container else "") + 'bash -c "$ORCHD_COMMAND"'
        lines.append("srun --kill-on-bad-exit=1 bash -c " + shlex.quote(
            "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec " + inner))
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ Backend

    def submit(self, req: SubmitRequest) -> str:
        log_path = self._path("logs", f"{req.run_name}.out")
        if req.spec.sbatch:
            job_id = self._sbatch_own(req, log_path)
        else:
            job_id = self._sbatch([req], req.run_name, log_path)
        return f"{job_id}@{log_path}"

    def job_env(self, req: SubmitRequest) -> dict[str, str]:
        """What a user's own batch script gets in its environment (sbatch exports the submitting
        environment by default, sbatch(1) ``--export``): the profile's env, the spec's, and orchd's
        variables."""
        return {**self.profile.env, **req.spec.env, "PYTHONUNBUFFERED": "1", "ORCHD_JOB_ID": str(req.job_id),
                "ORCHD_ATTEMPT": str(req.attempt), "ORCHD_JOB_DIR": self._path("jobs", str(req.job_id)),
                "ORCHD_RUN_NAME": req.run_name}

    def own_script_options(self, req: SubmitRequest, log_path: str) -> list[str]:
        """sbatch options for a user's own script, which goes unchanged: only what orchd needs,
        on the command line, where it overrides the script's ``#SBATCH`` lines (sbatch(1)): its
        job name and idempotency token, where its output goes, the directory it starts in (the
        spec's ``workdir``)."""
        options = [f"--job-name={req.run_name}", f"--output={log_path}", "--open-mode=append",
                   f"--chdir={req.spec.workdir}"]
        return options + ([f"--comment={req.token}"] if req.token else [])

    def _sbatch_own(self, req: SubmitRequest, log_path: str) -> str:
        """Submit the spec's own batch script unchanged (a copy is kept with the attempt for
        ``orchd show --script``). Returns the SLURM job id. Raises BackendError."""
        try:
            script = Path(req.spec.sbatch or "").read_bytes()
        except OSError as e:
            raise BackendError(f"{self.name}: cannot read the batch script {req.spec.sbatch}: {e.strerror}") from None
        env = self.job_env(req)
        try:
            for k, v in env.items():
                check_env(k, v)
        except UnsafeValue as e:
            raise BackendError(f"{self.name}: refusing to submit {req.run_name}: {e}") from None
        local_copy = req.job_dir / f"a{req.attempt}" / "job.sbatch"
        local_copy.parent.mkdir(parents=True, exist_ok=True)
        local_copy.write_bytes(script)
        return self._send(req.run_name, script, self.own_script_options(req, log_path), env)

    def _send(self, name: str, script: bytes, options: list[str], env: dict[str, str] | None = None) -> str:
        """Write ``script`` to the cluster (``scripts/<name>.sbatch``) and ``sbatch --parsable``
        it with ``options``; returns the job id. Raises BackendError."""
        script_path = self._path("scripts", f"{name}.sbatch")
        self.shell.write(script_path, script)
        self.shell.run(["mkdir", "-p", self._path("logs")])
        code, out, err = self._run(["sbatch", "--parsable", *options, script_path], env)
        if code != 0:
            raise BackendError(f"{self.name}: sbatch refused {name}: {err.strip() or out.strip()}")
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise BackendError(f"{self.name}: sbatch printed {out.strip()!r}, not a job id")
        return job_id

    def submit_array(self, reqs: list[SubmitRequest]) -> list[str]:
        """Submit a sweep's first attempts as one array job (``--array=0-N%max_parallel``);
        returns one backend id per request, ``<array id>_<task>@<log>``."""
        name = f"orchd-{reqs[0].job_id}-sweep"
        log_pattern = self._path("logs", f"{name}-%A_%a.out")
        array_id = self._sbatch(reqs, name, log_pattern, reqs[0].spec.max_parallel)
        return self._array_ids(array_id, reqs)

    def _array_ids(self, array_id: str, reqs: list[SubmitRequest]) -> list[str]:
        log_pattern = self._path("logs", f"orchd-{reqs[0].job_id}-sweep-%A_%a.out")
        return [f"{array_id}_{i}@" + log_pattern.replace("%A", array_id).replace("%a", str(i))
                for i in range(len(reqs))]

    def complete(self, spec: JobSpec) -> JobSpec:
        """``spec`` with the profile's ``gpus_per_node`` and ``cpus_per_task`` where the spec
        does not set them (a LUMI profile's 8 GCDs per node apply to every job on it)."""
        given = spec.resources.model_fields_set
        fill = {k: getattr(self.profile, k) for k in ("gpus_per_node", "cpus_per_task")
                if k not in given and getattr(self.profile, k)}
        return spec.model_copy(update={"resources": spec.resources.model_copy(update=fill)}) if fill else spec

    def find(self, req: SubmitRequest) -> str | None:
        """The SLURM job started for ``req`` (job name ``req.run_name``, comment ``req.token``):
        asked of squeue (every state, while slurmctld remembers it), then of sacct."""
        job_id = self._find_named(req.run_name, req.token)
        return None if job_id is None else f"{job_id}@{self._path('logs', f'{req.run_name}.out')}"

    def find_array(self, reqs: list[SubmitRequest]) -> list[str] | None:
        array_id = self._find_named(f"orchd-{reqs[0].job_id}-sweep", reqs[0].token)
        return None if array_id is None else self._array_ids(array_id, reqs)

    def _find_named(self, name: str, token: str) -> str | None:
        """The (array) job id of our job named ``name`` whose comment is ``token``. sacct shows
        comments only with AccountingStoreFlags=job_comment; without them, a job of that name
        submitted within a minute of the token's time is taken for it."""
        code, out, _ = self._run(["squeue", "-h", "-t", "all", f"--name={name}", "-o", "%F|%k"])
        for line in out.splitlines() if code == 0 else []:
            job_id, _, comment = line.partition("|")
            if comment.strip() == token and job_id.isdigit():
                return job_id
        try:
            t = int(token.rsplit(".", 1)[1], 16) / 1e6
        except (IndexError, ValueError):
            return None
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t - 60))
        code, out, _ = self._run(["sacct", "-X", "-n", "-P", f"--name={name}", "-S", since,
                                  "-o", "JobID,Comment,Submit"])
        for line in out.splitlines() if code == 0 else []:
            f = line.split("|")
            if len(f) < 3:
                continue
            job_id = f[0].split("_")[0]
            if f[1].strip() == token or (not f[1].strip() and _near(f[2], t)):
                return job_id if job_id.isdigit() else None
        return None

    def expected_wait(self, spec: JobSpec, now: float | None = None) -> float | None:
        """Seconds until a new attempt of ``spec`` would start, as the scheduler estimates it now
        (``sbatch --test-only``, sbatch(1): "validate the batch script and return an estimate of
        when a job would be scheduled to run"; nothing is submitted); None when it gives no
        estimate. Raises BackendError when the script cannot be written or is refused."""
        req = SubmitRequest(0, 0, spec, Path("/nonexistent"), token="")
        log_path = self._path("logs", "orchd-whatif.out")
        try:
            if spec.sbatch:
                script = Path(spec.sbatch).read_bytes()
                options = self.own_script_options(req, log_path)
            else:
                script, options = self.render_script([req], log_path).encode(), []
        except (OSError, UnsafeValue) as e:
            raise BackendError(f"{self.name}: cannot build the batch script to ask about: {e}") from None
        script_path = self._path("scripts", "orchd-whatif.sbatch")
        self.shell.write(script_path, script)
        code, out, err = self._run(["sbatch", "--test-only", *options, script_path])
        if code != 0:
            raise BackendError(f"{self.name}: sbatch --test-only refused the script: {err.strip() or out.strip()}")
        m = re.search(r"to start at (\S+)", err + out)  # "sbatch: Job 549 to start at 2026-11-23T21:06:11 using ..."
        if not m:
            return None
        code, out, _ = self._run(["date", "-d", m.group(1), "+%s"])  # the cluster's time zone, not ours
        if code != 0 or not out.strip().isdigit():
            return None
        return max(0.0, int(out.strip()) - (time.time() if now is None else now))

    def _sbatch(self, reqs: list[SubmitRequest], name: str, log_path: str, throttle: int | None = None) -> str:
        try:
            script = self.render_script(reqs, log_path, throttle)
        except UnsafeValue as e:
            raise BackendError(f"{self.name}: refusing to write {name}'s script: {e}") from None
        for r in reqs:  # kept with each attempt, for `orchd show --script`
            local_copy = r.job_dir / f"a{r.attempt}" / "job.sbatch"
            local_copy.parent.mkdir(parents=True, exist_ok=True)
            local_copy.write_text(script)
        return self._send(name, script.encode(), [])

    def poll(self, ids: list[str], leased: Mapping[str, str] = NO_LEASES) -> dict[str, Observation]:
        by_slurm = {i.split("@")[0]: i for i in ids}
        if not by_slurm:
            return {}
        # JobID, not JobIDRaw: array tasks are "<array id>_<task>" (pending ones come collapsed,
        # "<id>_[2-9%2]", and are asked of squeue -r below)
        code, out, err = self._run(["sacct", "-X", "-n", "-P", "-j", ",".join(by_slurm),
                                    "-o", "JobID,State,ExitCode,DerivedExitCode"])
        seen: dict[str, Observation] = {}
        if code == 0:
            for backend_id, state, rest, f in _rows(out, by_slurm, 4):
                exit_code = parse_exit(f[2], f[3]) if state.terminal else None
                seen[backend_id] = Observation(state, exit_code, f[1].strip() if rest else "")
        else:
            if not self._warned_sacct:
                log.warning("%s: sacct failed (%s); falling back to squeue, which forgets ended jobs after "
                            "MinJobAge", self.name, err.strip())
                self._warned_sacct = True
            return self._squeue(by_slurm)
        # squeue for what sacct cannot tell: why a job waits, and jobs slurmdbd has not recorded yet
        # (it lags sbatch by a moment); at most one call, none while everything runs
        ask = {k: v for k, v in by_slurm.items() if v not in seen or seen[v].state == JobState.PENDING}
        if ask:
            # an end squeue knows but sacct not yet has no exit code: wait a tick for sacct's
            seen.update({k: o for k, o in self._squeue(ask).items() if not o.state.terminal or o.reason})
        return seen

    def _squeue(self, by_slurm: dict[str, str]) -> dict[str, Observation]:
        code, out, err = self._run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(by_slurm),
                                    "-o", "%i|%T|%r|%S"])
        if code != 0:
            raise BackendError(f"{self.name}: squeue failed: {err.strip()}")
        seen = {}
        for backend_id, state, _, f in _rows(out, by_slurm, 4):
            if state == JobState.PENDING and f[2] in NEVER_STARTS:
                self.cancel(backend_id)
                seen[backend_id] = Observation(JobState.FAILED, None, f"can never start as requested: SLURM "
                                               f"reason {f[2]} (see squeue(1) JOB REASON CODES)")
                continue
            why = f"{f[2]}" + (f", expected start {f[3]}" if f[3] not in ("N/A", "Unknown", "") else "")
            seen[backend_id] = Observation(state, None, why if state == JobState.PENDING else "")
        return seen

    def usd_per_hour(self, spec: JobSpec, backend_id: str | None = None) -> float | None:
        """GPUs x the profile's ``usd_per_gpu_hour`` (None when the cluster is not priced)."""
        rate = self.profile.usd_per_gpu_hour
        return None if rate is None else rate * spec.resources.nodes * spec.resources.gpus_per_node

    def read_log(self, backend_id: str, offset: int, max_bytes: int) -> bytes:
        return self.shell.read(backend_id.split("@", 1)[1], offset, max_bytes)

    def describe(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o JOB`` as {field: value} (scontrol(1); values may hold spaces).
        Raises BackendError if SLURM does not know the job (any more)."""
        if not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise BackendError(f"{job_id!r} is not a SLURM job id (123, or 123_4 for an array task)")
        code, out, err = self._run(["scontrol", "show", "job", "-o", job_id])
        if code != 0 or "JobId=" not in out:
            raise BackendError(f"{self.name}: SLURM does not know job {job_id}: {(err or out).strip()[:300]}")
        line = out.strip().splitlines()[0]
        return dict(part.split("=", 1) for part in re.split(r" (?=[A-Za-z][\w:/]*=)", line) if "=" in part)

    def batch_script(self, job_id: str) -> bytes:
        """The job's batch script as SLURM keeps it (``scontrol write batch_script JOB -``).
        Raises BackendError if there is none (not an sbatch job) or SLURM will not give it."""
        code, out, err = self._run(["scontrol", "write", "batch_script", job_id.split("_")[0], "-"])
        if code != 0 or not out.startswith("#!"):
            raise BackendError(f"{self.name}: no batch script for job {job_id} (scontrol write batch_script: "
                               f"{(err or out).strip()[:300]}); orchd can only watch jobs submitted with sbatch")
        return out.encode()

    def cancel(self, backend_id: str) -> None:
        code, _, err = self._run(["scancel", backend_id.split("@")[0]])
        if code != 0 and "Invalid job id" not in err:
            raise BackendError(f"{self.name}: scancel failed: {err.strip()}")
