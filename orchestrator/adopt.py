"""Bring your own job: orchd watches a SLURM job it did not submit (``orchd watch``), including
a submitit job, with the same rules, alerts and retries as its own.

An adopted job is an ordinary orchd job whose first attempt was started by someone else: its
backend id is ``<SLURM job id>@<its stdout file>``, so the tick polls it in the same batched
``sacct`` and reads its log from byte 0 (the missing keys it already printed count). Its spec is
the rules file (a spec without ``command``) plus what SLURM says of the job: name, working
directory, nodes, partition, account, time limit, and its own batch script (``scontrol write
batch_script``, kept in ``$ORCHD_HOME/adopted/``), which a retry resubmits unchanged through
``sbatch:`` with those options on sbatch's command line.

A submitit job (https://github.com/facebookincubator/submitit) is read through submitit's own
API (``job.job_id``, ``job.paths``, ``job.exception()``); when it ends, an exception its function
raised is the attempt's reason. orchd does not resubmit a submitit job: submitit names its
pickles after the job id, so a resubmitted script would not find its function.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from orchestrator.errors import BackendError, ConfigError, SpecError
from orchestrator.lifecycle import Reason, switch_state
from orchestrator.models import Attempt, Event, Job
from orchestrator.specfile import format_errors, load_yaml
from orchestrator.states import JobState

# keys a rules file may not set: SLURM and the job itself say them
NOT_IN_RULES = ("command", "sbatch", "backend", "cluster", "sweep", "max_parallel", "submitit")


def expand_output(pattern: str, info: dict[str, str]) -> str:
    """A ``--output`` filename pattern with sbatch(1)'s replacement symbols ("filename pattern")
    filled from ``scontrol show job``: ``%j``/``%J`` job id, ``%A`` array master id, ``%a`` array
    task id, ``%x`` job name, ``%u`` user name, ``%N`` first node, ``%%``; a number after ``%``
    zero-pads. Recent SLURM versions (22.05 here) already expand StdOut; older ones do not."""
    job = info.get("JobId", "")
    values = {"j": job, "J": job, "A": info.get("ArrayJobId", job), "a": info.get("ArrayTaskId", ""),
              "x": info.get("JobName", ""), "u": info.get("UserId", "").split("(")[0],
              "N": info.get("BatchHost", "") or info.get("NodeList", "").split(",")[0], "%": "%"}

    def fill(m: re.Match[str]) -> str:
        v = values.get(m[2])
        if v is None:
            return m[0]
        return v.zfill(int(m[1])) if m[1] and v.isdigit() else v

    return re.sub(r"%(\d*)([jJAaxuN%])", fill, pattern)


def load_rules(path: str | None, defaults: dict[str, Any], fixed: dict[str, Any]) -> Any:
    """The spec of an adopted job: the rules file at ``path`` (or none) over ``defaults``, with
    ``fixed`` set. Raises SpecError naming file:line for a bad rules file or a key it may not set."""
    from orchestrator.spec import JobSpec

    data: dict[str, Any] = {}
    lines: dict = {}
    where = path or "(no rules file)"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{path}: cannot read the rules file: {e}") from None
        data, lines = load_yaml(text, path, SpecError, "a rules file is a mapping of keys (expect, success, ...)")
        for key in NOT_IN_RULES:
            if key in data:
                raise SpecError(f"{path}:{lines.get((key,), 1)}: {key}: not in a rules file (the watched job "
                                "already says what runs where)")
    merged = {**defaults, **data, **fixed}
    if isinstance(data.get("resources"), dict):  # the rules' resources over SLURM's, key by key
        merged["resources"] = {**defaults.get("resources", {}), **data["resources"]}
    try:
        return JobSpec.model_validate(merged)
    except ValidationError as e:
        raise SpecError(format_errors(e, where, lines)) from None


def _epoch(slurm_time: str) -> float | None:
    try:
        return time.mktime(time.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _time_limit(text: str) -> float | None:
    """scontrol's TimeLimit (``[D-]HH:MM:SS``, ``UNLIMITED``) in seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", text or "")
    if not m:
        return None
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def watch(app: Any, slurm_job: str, cluster: str | None = None, log: str | None = None,
          rules: str | None = None, name: str | None = None, submitit_folder: str | None = None) -> int:
    """Adopt SLURM job ``slurm_job`` (``123`` or an array task ``123_4``) on ``cluster`` (default:
    the only cluster configured) as a new orchd job; returns its id. Its log is ``log`` or the
    job's StdOut. Raises ConfigError (no such cluster), BackendError (SLURM does not know the job
    or it already ended), SpecError (rules file), ValueError (already watched)."""
    from orchestrator.backends.slurm import SlurmBackend, parse_state

    clusters = sorted(app.config.clusters)
    if cluster is None:
        if len(clusters) != 1:
            raise ConfigError(f"say which cluster with --cluster (configured: {clusters or 'none'})")
        cluster = clusters[0]
    backend = app.backend(f"slurm:{cluster}")
    assert isinstance(backend, SlurmBackend)
    info = backend.describe(slurm_job)
    state = info.get("JobState", "")
    known, _ = parse_state(state)
    if known is None or known.terminal:
        raise BackendError(f"SLURM job {slurm_job} is {state or 'in no known state'}; orchd watches pending or "
                           "running jobs")
    job_id = info["JobId"] if "_" not in slurm_job else slurm_job
    log_path = log or expand_output(info.get("StdOut", ""), info)
    if not log_path:
        raise BackendError(f"SLURM job {slurm_job} has no StdOut; give the log with --log")
    backend_id = f"{job_id}@{log_path}"
    with app.sessions() as s:
        taken = s.scalars(select(Attempt.job_id).join(Job).where(Job.backend == backend.name,
                                                                  Attempt.backend_id.like(f"{job_id}@%"))).first()
    if taken is not None:
        raise ValueError(f"SLURM job {job_id} is already watched as orchd job {taken}")
    kept = app.settings.home / "adopted" / f"{cluster}-{job_id}.sbatch"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(backend.batch_script(job_id))
    resources: dict[str, Any] = {"nodes": int(info.get("NumNodes", "1").split("-")[0] or 1)}
    for key, field in (("Partition", "partition"), ("Account", "account")):
        if info.get(key) and info[key] != "(null)":
            resources[field] = info[key]
    if (limit := _time_limit(info.get("TimeLimit", ""))) is not None:
        resources["time_limit"] = f"{limit:.0f}s"
    defaults = {"name": name or info.get("JobName") or f"slurm-{job_id}", "workdir": info.get("WorkDir") or ".",
                "resources": resources}
    fixed: dict[str, Any] = {"backend": "slurm", "cluster": cluster, "sbatch": str(kept)}
    if submitit_folder:
        fixed["submitit"] = submitit_folder
        fixed["retry"] = {"max_attempts": 1}  # see the module's docstring
    spec = load_rules(rules, defaults, fixed)
    now = time.time()
    with app.sessions.begin() as s:
        job = Job(name=spec.name, project=spec.project, backend=backend.name, state=JobState.PENDING.value,
                  reason=Reason.SUBMITTED.value, detail="", spec_json=spec.model_dump_json(),
                  spec_path=str(Path(rules).resolve()) if rules else "", created_at=now, cost_usd=0.0)
        s.add(job)
        s.flush()
        s.add(Event(job_id=job.id, at=now, from_state=None, to_state=JobState.PENDING.value,
                    reason=Reason.SUBMITTED.value, detail=f"watching SLURM job {job_id} on {cluster}"))
        att = Attempt(job_id=job.id, number=1, state=JobState.PENDING.value, submitted_at=_epoch(
            info.get("SubmitTime", "")) or now)
        s.add(att)
        job.attempts.append(att)
        app.ticker.adopted(s, job, att, backend, backend_id, now)
        kept_here = app.settings.jobs_dir / str(job.id) / "a1" / "job.sbatch"  # for `orchd show --script`
        kept_here.parent.mkdir(parents=True, exist_ok=True)
        kept_here.write_bytes(kept.read_bytes())
        if known != JobState.PENDING:
            att.state, att.started_at = JobState.RUNNING.value, _epoch(info.get("StartTime", "")) or now
            switch_state(s, job, JobState.RUNNING, Reason.STARTED, f"SLURM job {job_id} runs", now, att)
        return job.id


def watch_submitit(app: Any, job: Any, rules: str | None = None, cluster: str | None = None) -> int:
    """Adopt a ``submitit.Job`` (submitit's SLURM executor) as an orchd job; returns its id. Its
    log is the job's stdout (``job.paths.stdout``); when it ends, an exception its function raised
    (``job.exception()``) is the attempt's reason. Raises as ``watch``."""
    return watch(app, str(job.job_id), cluster=cluster, log=str(job.paths.stdout), rules=rules,
                 submitit_folder=str(job.paths.folder))


def submitit_failure(folder: str, slurm_job: str) -> str | None:
    """The last line of the exception a submitit job's function raised (``job.exception()``), or
    None if it returned, or its outcome cannot be read (no result pickle: killed, or never ran)."""
    try:
        import submitit

        job = submitit.SlurmJob(folder, slurm_job)
        if not job.paths.result_pickle.exists():
            return None  # killed, or never ran its function: SLURM's own end says it (and exception() would wait)
        exc = job.exception()
    except Exception as e:  # noqa: BLE001 - submitit raises what its unpickling meets; never the tick's trouble
        return f"(submitit: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''})"
    if exc is None:
        return None
    # submitit's FailedJobError carries the traceback: its last "Name: message" line is what was raised
    raised = [ln for ln in str(exc).splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|"
                                                            r"Warning)?: ", ln)]
    return (raised[-1] if raised else f"{type(exc).__name__}: {str(exc).strip()[:300]}")[:500]
