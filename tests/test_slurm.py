"""The slurm backend against a real SLURM (scripts/start-local-slurm.sh: slurmctld, 2 slurmd
"nodes" with 2 fake GPUs each, slurmdbd + MariaDB) and, for SSH mode, a real OpenSSH server on
loopback (scripts/start-local-sshd.sh). Skipped when no such SLURM runs here, unless
ORCHD_REQUIRE_SLURM=1 (as in CI), which makes that a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import service
from orchestrator.backends.slurm import SlurmBackend, parse_exit, parse_state, slurm_time
from orchestrator.clusters import ClusterProfile
from orchestrator.states import JobState
from tests.conftest import wait_for, write_spec

LAB = Path(os.environ.get("SLURMLAB_DIR", "/tmp/orchd-slurm"))
SLURM_CONF = LAB / "etc" / "slurm.conf"
SSH_DIR = LAB / "ssh"
SCTL = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}


def _slurm_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=SCTL, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not SLURM_CONF.exists() or not _slurm_up():
        if os.environ.get("ORCHD_REQUIRE_SLURM") == "1":
            pytest.fail("no local SLURM: run scripts/start-local-slurm.sh (as root)")
        pytest.skip("no local SLURM (scripts/start-local-slurm.sh starts one)")
    yield
    subprocess.run(["scancel", "--user=" + os.environ.get("USER", "root")],
                   env=SCTL, capture_output=True)  # a failed test must not leave jobs queued for the next


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], env=SCTL, check=True, capture_output=True)


def lab_profile(tmp: Path, mode: str = "local") -> dict:
    p = {"mode": mode, "slurm_conf": str(SLURM_CONF), "partition": "debug", "work_dir": str(tmp / "cluster"),
         "env": {"PATH": f"{Path(os.sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"}}
    if mode == "ssh":
        p.update(host="127.0.0.1", port=2222, user="root", key_file=str(SSH_DIR / "client_ed25519"),
                 known_hosts=str(SSH_DIR / "known_hosts"))
    return p


@pytest.fixture
def lab(home: Path, tmp_path: Path) -> Path:
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path)}}))
    return tmp_path


def spec(tmp: Path, command: str, nodes: int = 1, gpus: int = 0, extra: str = "", limit: str = "10m") -> Path:
    return write_spec(tmp, f"""name: slurm-test
backend: slurm
cluster: lab
command: {json.dumps(command)}
resources: {{nodes: {nodes}, gpus_per_node: {gpus}, time_limit: {limit}}}
metrics: [val_loss, train_loss, nrmse]
{extra}""")


def wait_job(app: service.App, job: int, pred, timeout: float, what: str) -> dict:
    def check():
        app.ticker.tick(lock_timeout=5)
        d = service.job_detail(app, job)
        return d if pred(d) else None

    return wait_for(check, timeout, interval=1.0, what=what)


def done(d: dict) -> bool:
    return JobState(d["state"]).terminal


# ------------------------------------------------------------------ pure parts


def test_formats():
    assert slurm_time(60) == "0-00:01:00" and slurm_time(61) == "0-00:02:00" and slurm_time(90000) == "1-01:00:00"
    assert parse_exit("0:0") == 0 and parse_exit("3:0") == 3 and parse_exit("0:9") == 137 and parse_exit("x") is None
    assert parse_state("CANCELLED by 0") == (JobState.CANCELLED, "by 0")
    assert parse_state("NODE_FAIL")[0] == JobState.NODE_FAIL and parse_state("REQUEUED")[0] == JobState.PENDING
    assert parse_state("WEIRD") == (None, "")


def test_script_is_multinode_ddp_ready(tmp_path):
    from orchestrator.backends.base import SubmitRequest
    from orchestrator.spec import JobSpec

    prof = ClusterProfile(account="project_465000123", partition="standard-g", gpus_per_node=8, vendor="amd",
                          modules=["LUMI/24.03", "partition/G"], container="singularity exec --rocm img.sif",
                          sbatch_extra=["--exclusive"], env={"MIOPEN_USER_DB_PATH": "/tmp/miopen"},
                          work_dir="/scratch/project_465000123/orchd")
    s = JobSpec.model_validate({"name": "x", "backend": "slurm", "cluster": "lumi", "command": "python train.py 'a b'",
                                "workdir": str(tmp_path), "resources": {"nodes": 4, "gpus_per_node": 8,
                                                                        "time_limit": "2h"}})
    script = SlurmBackend("lumi", prof, shell=object()).render_script([SubmitRequest(7, 2, s, tmp_path)], "/l.out")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=0-02:00:00", "#SBATCH --account=project_465000123",
                 "#SBATCH --partition=standard-g", "#SBATCH --exclusive", "module load LUMI/24.03",
                 "export MIOPEN_USER_DB_PATH=/tmp/miopen", "export WORLD_SIZE=$SLURM_NTASKS",
                 "export ORCHD_JOB_DIR=/scratch/project_465000123/orchd/jobs/7", "export ORCHD_ATTEMPT=2"]:
        assert line in script.splitlines(), line
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID" in script and "singularity exec --rocm img.sif" in script
    # the command survives both levels of quoting: run the srun line with stand-ins on PATH
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in {"srun": 'shift; exec "$@"', "singularity": 'shift 3; exec "$@"',
                       "python": "printf '%s|' \"$@\""}.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    lines = script.splitlines()
    tail = "\n".join(x for x in lines if x.startswith("export ORCHD_COMMAND") or x.startswith("srun"))
    out = subprocess.run(["bash", "-c", tail], capture_output=True, text=True,
                         env={"PATH": f"{fake}:/usr/bin:/bin", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"})
    assert out.stdout == "train.py|a b|", out.stderr


# ------------------------------------------------------------------ real SLURM


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "ssh"])
def test_main_slurm_spec_2_nodes_x_2_tasks(mode, home, tmp_path, env, orchd):
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path, mode)}}))
    job = int(orchd("submit", "jobspecs/sota_push_v2_slurm.yaml", "--wait", timeout=240).stdout.split()[0])
    d = service.job_detail(service.open_app(env), job)
    assert d["state"] == "COMPLETED", d
    assert [p["step"] for p in d["metrics"]["val_loss"]] == list(range(15, 271, 15))
    log = orchd("logs", str(job)).stdout
    assert "4 tasks, master 127.0.0.1" in log and "ranks=4" in log
    assert "#SBATCH --nodes=2" in orchd("show", str(job), "--script").stdout


@pytest.mark.slow
def test_own_sbatch_script_runs_unchanged_to_completed(home, tmp_path, env, orchd):
    """``sbatch:`` in a spec: the repository's own batch script for the Burgers training is
    submitted as it is (orchd's additions are on sbatch's command line) and watched like any job."""
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path)}}))
    assert "sbatch --parsable --job-name=orchd-0-a1" in orchd("submit", "jobspecs/burgers_sbatch.yaml",
                                                              "--dry-run").stdout
    job = int(orchd("submit", "jobspecs/burgers_sbatch.yaml", "--wait", timeout=240).stdout.split()[0])
    d = service.job_detail(service.open_app(env), job)
    assert d["state"] == "COMPLETED", d
    assert [p["step"] for p in d["metrics"]["val_loss"]] == list(range(15, 91, 15))
    script = (Path(__file__).resolve().parents[1] / "workloads" / "burgers.sbatch").read_text()
    assert orchd("show", str(job), "--script").stdout.strip() == script.strip()  # unchanged
    assert "burgers on node" in orchd("logs", str(job)).stdout


def node2_fails_mid_training(app: service.App, job: int) -> dict:
    """Once the job has logged two evaluations, take node2 down until SLURM ends the attempt
    (NODE_FAIL), then bring it back; returns the job's detail at that point."""
    wait_job(app, job, lambda d: len(d["metrics"].get("val_loss", [])) >= 2, 120, "training under way")
    scontrol("update", "nodename=node2", "state=down", "reason=orchd-test")
    try:
        return wait_job(app, job, lambda d: d["attempts"][0]["state"] != "RUNNING", 60, "NODE_FAIL seen")
    finally:
        scontrol("update", "nodename=node2", "state=resume")


def plain_sbatch(script: Path) -> str:
    """Submit ``script`` with plain sbatch, as a person would (from the repository root); returns its id."""
    p = subprocess.run(["sbatch", "--parsable", str(script)], env=SCTL, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], check=True)
    return p.stdout.strip().split(";")[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "ssh"])
def test_watch_adopts_a_bad_checkpoint_job_and_cancels_it(mode, home, tmp_path, env, orchd):
    """A job submitted with plain sbatch, adopted by ``orchd watch`` with a rules file (the cluster
    reached locally or over SSH): its missing-keys expectation is enforced (scancelled in the tick
    that reads the report)."""
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path, mode)}}))
    script = tmp_path / "finetune.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=topoflow-ft
#SBATCH --output={tmp_path}/ft-%x-%j.out
{sys.executable} -m workloads.finetune --depths 2 2 2 --epochs 30 --base {tmp_path}/base/latest.pt --base-depths 1 1 1
""")
    rules = tmp_path / "rules.yaml"
    rules.write_text("expect:\n  missing_keys: [climax.blocks.0.attn.elevation_alpha, climax.blocks.0.attn.H_scale]\n")
    slurm_id = plain_sbatch(script)
    job = int(orchd("watch", slurm_id, "--spec", str(rules)).stdout.split()[0])
    assert "workloads.finetune" in orchd("show", str(job), "--script").stdout  # its own script, as SLURM kept it
    with pytest.raises(AssertionError, match="already watched"):
        orchd("watch", slurm_id)
    app = service.open_app(env)
    d = wait_job(app, job, done, 180, "the bad checkpoint to be caught")
    assert d["name"] == "topoflow-ft" and d["state"] == "FAILED" and d["reason"] == "BAD_CHECKPOINT", d
    assert "38 missing keys, expected exactly 2" in d["detail"]
    assert d["attempts"][0]["backend_id"] == f"{slurm_id}@{tmp_path}/ft-topoflow-ft-{slurm_id}.out"
    wait_for(lambda: "CANCELLED" in subprocess.run(["sacct", "-X", "-n", "-P", "-j", slurm_id, "-o", "State"],
                                                   env=SCTL, capture_output=True, text=True).stdout,
             30, interval=1, what="SLURM to record the scancel")
    kinds = [a["kind"] for a in d["actions"]]
    assert kinds[0] == "adopt" and "cancel" in kinds
    from sqlalchemy import select

    from orchestrator.models import Action, KeysReport

    with app.sessions() as s:
        report = s.scalars(select(KeysReport).where(KeysReport.job_id == job).order_by(KeysReport.id)).first()
        cancel = s.scalars(select(Action).where(Action.job_id == job, Action.kind == "cancel")).one()
    assert cancel.at == report.at  # scancelled in the tick that read the report


@pytest.mark.slow
def test_watched_job_node_fail_resubmits_its_own_script(home, tmp_path, env, orchd):
    """An adopted job's val_loss is recorded and, after a NODE_FAIL, ``retry`` resubmits the job's
    own batch script (as SLURM kept it) with its options, to COMPLETED. (The script says
    ``--no-requeue``: a job that lets SLURM requeue it is requeued by SLURM itself, under the same
    id, which orchd simply goes on watching; CI once saw that race.)"""
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path)}}))
    script = tmp_path / "burgers.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=burgers-mine
#SBATCH --nodes=2
#SBATCH --no-requeue
#SBATCH --output={tmp_path}/mine-%j.out
{sys.executable} -m workloads.burgers --epochs 4 --step-delay 0.1 --ckpt-dir {tmp_path}/ckpt
""")
    rules = tmp_path / "rules.yaml"
    rules.write_text("metrics: [val_loss, train_loss]\nretry: {max_attempts: 2, backoff: 2s, on: [NODE_FAIL]}\n")
    slurm_id = plain_sbatch(script)
    job = int(orchd("watch", slurm_id, "--cluster", "lab", "--spec", str(rules)).stdout.split()[0])
    app = service.open_app(env)
    d = node2_fails_mid_training(app, job)
    d = wait_job(app, job, done, 240, "the resubmitted script to complete")
    assert d["state"] == "COMPLETED" and [a["state"] for a in d["attempts"]] == ["NODE_FAIL", "COMPLETED"], d
    assert d["metrics"]["val_loss"][0]["attempt"] == 1 and d["metrics"]["val_loss"][-1]["attempt"] == 2
    kept = orchd("show", str(job), "--script").stdout
    assert kept.strip() == script.read_text().strip()  # its own script, unchanged
    second = d["attempts"][1]["backend_id"].split("@")[0]
    info = subprocess.run(["scontrol", "show", "job", "-o", second], env=SCTL, capture_output=True, text=True).stdout
    assert "NumNodes=2" in info or info == ""  # its options went with it (or slurmctld forgot it already)


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True])
def test_submitit_job_adopted_completes_or_fails_with_its_exception(home, tmp_path, env, monkeypatch, fail):
    """A job launched with submitit's SLURM executor (real SLURM) and handed to orchd: it ends
    COMPLETED with its metrics, or, when its function raises, FAILED with the exception's text."""
    submitit = pytest.importorskip("submitit")
    from orchestrator.adopt import watch_submitit
    from workloads.submitit_burgers import train

    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path)}}))
    monkeypatch.setenv("SLURM_CONF", str(SLURM_CONF))  # submitit calls sbatch and sacct itself
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the job imports workloads from here
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=10, nodes=1, tasks_per_node=1, slurm_partition="debug")
    sjob = executor.submit(train, 2, str(tmp_path / "ckpt"), fail)
    rules = tmp_path / "rules.yaml"
    rules.write_text("metrics: [val_loss]\nsuccess: val_loss < 0.5\n")
    app = service.open_app(env)
    job = watch_submitit(app, sjob, rules=str(rules))
    d = wait_job(app, job, done, 180, "the submitit job to end")
    if fail:
        assert d["state"] == "FAILED", d
        assert "ValueError: learning rate schedule needs epochs >= 3, got 2" in d["detail"], d["detail"]
    else:
        assert d["state"] == "COMPLETED", d
        assert [p["step"] for p in d["metrics"]["val_loss"]] == list(range(15, 91, 15))
        assert d["attempts"][0]["backend_id"] == f"{sjob.job_id}@{sjob.paths.stdout}"


@pytest.mark.slow
def test_node_fail_is_retried_and_completes(lab, app):
    s = spec(lab, "python -m workloads.burgers --epochs 4 --step-delay 0.1", nodes=2,
             extra="retry: {max_attempts: 2, backoff: 2s, on: [NODE_FAIL]}")
    (job,) = service.submit(app, s)
    d = node2_fails_mid_training(app, job)
    assert d["attempts"][0]["state"] == "NODE_FAIL"
    d = wait_job(app, job, done, 240, "retry to complete")
    assert d["state"] == "COMPLETED" and [a["state"] for a in d["attempts"]] == ["NODE_FAIL", "COMPLETED"]
    assert any("matches retry.on 'NODE_FAIL'" in a["reason"] for a in d["actions"] if a["kind"] == "retry")


@pytest.mark.slow
def test_timeout_resumes_from_checkpoint(lab, app):
    # ~95 s of training in a 1-minute limit: attempt 1 hits TIMEOUT (~60-68 s), attempt 2 resumes
    s = spec(lab, "python -m workloads.burgers --epochs 6 --step-delay 0.33", limit="1m",
             extra="retry: {max_attempts: 2, backoff: 1s, on: [TIMEOUT]}")
    (job,) = service.submit(app, s)
    d = wait_job(app, job, done, 300, "timeout and resume")
    assert [a["state"] for a in d["attempts"]] == ["TIMEOUT", "COMPLETED"], d["attempts"]
    first_of_2 = min(p["step"] for p in d["metrics"]["val_loss"] if p["attempt"] == 2)
    assert first_of_2 > 30  # attempt 2 did not start over
    backend, att, _ = service.log_source(app, job, 2)
    assert b"resumed from checkpoint" in backend.read_log(att.backend_id, 0, 1 << 20)


@pytest.mark.slow
def test_nccl_error_resubmits_with_fewer_nodes(lab, app):
    s = spec(lab, "python -m workloads.burgers --epochs 2 --nccl-error-at-step 20", nodes=2, gpus=2, extra="""
retry:
  max_attempts: 2
  backoff: 1s
  on: [{when: "log:NCCL error", override: {resources: {nodes: 1}}}]""")
    (job,) = service.submit(app, s)
    d = wait_job(app, job, done, 240, "NCCL retry to complete")
    assert d["state"] == "COMPLETED" and [a["state"] for a in d["attempts"]] == ["FAILED", "COMPLETED"]
    assert "log:NCCL error in log" in d["attempts"][0]["reason"]
    assert d["attempts"][1]["override"] == {"resources": {"nodes": 1}}
    script = (app.settings.jobs_dir / str(job) / "a2" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script


@pytest.mark.slow
def test_queue_reason_one_sacct_per_tick_and_cancel(lab, app):
    ids = [service.submit(app, spec(lab, "sleep 120", nodes=2, gpus=2), start_now=False)[0] for _ in range(10)]
    app.ticker.tick()  # submits all ten
    backend = app.backend("slurm:lab")
    backend.calls.clear()
    wait_job(app, ids[0], lambda d: d["state"] == "RUNNING", 30, "first job running")
    backend.calls.clear()
    app.ticker.tick()
    assert backend.calls["sacct"] == 1  # one batched call for all ten
    rows = {r["id"]: r for r in service.job_summaries(app)}
    assert rows[ids[1]]["state"] == "PENDING" and "Resources" in rows[ids[1]]["detail"]
    for i in ids:
        service.cancel(app, i)
    # every attempt scancelled: the queue empties (wait_for fails after 30 s otherwise)
    wait_for(lambda: subprocess.run(["squeue", "-h", "-o", "%i"], env=SCTL, capture_output=True,
                                    text=True).stdout.strip() == "", 30, what="queue empty")
    assert all(service.job_detail(app, i)["state"] == "CANCELLED" for i in ids)


def test_impossible_request_fails_clearly_and_leaves_no_job(lab, app):
    (job,) = service.submit(app, spec(lab, "true", nodes=64))
    d = wait_job(app, job, done, 30, "impossible job refused")
    assert d["state"] == "FAILED" and "can never start as requested: SLURM reason PartitionConfig" in d["detail"]
    slurm_id = d["attempts"][0]["backend_id"].split("@")[0]
    q = subprocess.run(["squeue", "-h", "-j", slurm_id], env=SCTL, capture_output=True, text=True)
    assert q.stdout.strip() == ""  # scancelled, not left waiting forever


def test_unknown_cluster_refused_before_writing(lab, app, tmp_path):
    from orchestrator.errors import ConfigError

    p = write_spec(tmp_path, "name: x\nbackend: slurm\ncluster: nowhere\ncommand: 'true'\n", "c.yaml")
    with pytest.raises(ConfigError, match="cluster 'nowhere' is not in"):
        service.submit(app, p)
    assert service.job_summaries(app, include_all=True) == []


@pytest.mark.slow
def test_sweep_runs_as_one_throttled_array(lab, app):
    s = write_spec(lab, """name: arr
backend: slurm
cluster: lab
command: python -m workloads.burgers --epochs 1 --depths {depths}
resources: {time_limit: 10m}
sweep: {depths: ["1 1 1", "1 1", "2"]}
max_parallel: 2
metrics: [val_loss]
""", "arr.yaml")
    ids = service.submit(app, s)
    ds = [wait_job(app, i, done, 240, f"array task of job {i}") for i in ids]
    assert [d["state"] for d in ds] == ["COMPLETED"] * 3
    array_ids = {d["attempts"][0]["backend_id"].split("_")[0] for d in ds}
    assert len(array_ids) == 1  # one sbatch for the sweep
    assert [d["attempts"][0]["backend_id"].split("@")[0].split("_")[1] for d in ds] == ["0", "1", "2"]
    script = service.attempt_script(app, ids[0])
    assert "#SBATCH --array=0-2%2" in script and "--depths 1 1" in script
    assert all(d["metrics"]["val_loss"] for d in ds)  # each task's own log was read


@pytest.mark.slow
def test_preempted_job_is_resubmitted_and_resumes(lab, app):
    # the job fills both nodes' CPUs on partition debug; a job on partition high (PriorityTier 10,
    # PreemptMode=REQUEUE) takes them, and a --no-requeue job ends PREEMPTED
    s = write_spec(lab, """name: victim
backend: slurm
cluster: lab
command: python -m workloads.burgers --epochs 3 --step-delay 0.1
resources: {nodes: 2, cpus_per_task: 4, time_limit: 10m}
metrics: [val_loss]
retry: {max_attempts: 2, backoff: 1s, on: [PREEMPTED]}
""", "victim.yaml")
    (job,) = service.submit(app, s)
    wait_job(app, job, lambda d: len(d["metrics"].get("val_loss", [])) >= 1, 120, "first checkpoint")
    subprocess.run(["sbatch", "-p", "high", "-N", "2", "--ntasks-per-node=4", "-o", "/dev/null", "--wrap", "sleep 1"],
                   env=SCTL, check=True, capture_output=True)
    d = wait_job(app, job, done, 240, "preemption, retry and completion")
    assert [a["state"] for a in d["attempts"]] == ["PREEMPTED", "COMPLETED"]
    backend, att, _ = service.log_source(app, job, 2)
    assert b"resumed from checkpoint" in backend.read_log(att.backend_id, 0, 1 << 20)


def test_a_requeued_job_shows_queued_then_runs_again(home, tmp_path, app):
    """``scontrol requeue`` (what a node failure or a preemption does to a --requeue job) puts a
    running job back in SLURM's queue under the same id: orchd shows it PENDING (QUEUED, action
    "requeued"), not RUNNING, and follows the same attempt back to RUNNING and COMPLETED."""
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": {**lab_profile(tmp_path), "requeue": True}}}))
    s = spec(tmp_path, "python -m workloads.burgers --epochs 2 --step-delay 0.1")
    (job,) = service.submit(app, s)
    d = wait_job(app, job, lambda d: len(d["metrics"].get("val_loss", [])) >= 1, 120, "the first val_loss")
    slurm_id = d["attempts"][0]["backend_id"].split("@")[0]
    node = subprocess.run(["squeue", "-h", "-j", slurm_id, "-o", "%N"], env=SCTL, check=True, capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["scontrol", "requeue", slurm_id], env=SCTL, check=True, capture_output=True)
    d = wait_job(app, job, lambda d: d["state"] == "PENDING", 60, "orchd to see the requeue")
    assert d["reason"] == "QUEUED" and d["attempts"][0]["state"] == "PENDING"
    assert any(a["kind"] == "requeued" for a in d["actions"])
    # SLURM holds a requeued job until the credential of its killed run expires (CredExpire, 120 s
    # by default: a node refuses to start it again before, "Job credential revoked"); release it
    # now on the other node, as a node failure would
    subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "StartTime=now", f"ExcNodeList={node}"], env=SCTL,
                   check=True, capture_output=True)
    d = wait_job(app, job, done, 300, "the requeued job to run again and end")
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1, d["attempts"]
    assert [e["to"] for e in d["events"] if e["reason"] != "ATTEMPT_END"][-3:] == ["PENDING", "RUNNING", "COMPLETED"]


class ScriptedShell:
    """The cluster's answers as sacct/squeue print them, for the paths a healthy lab never takes."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]):
        self.answers, self.calls = answers, []

    def run(self, argv, env=None):
        self.calls.append(argv[0])
        return self.answers[argv[0]]


def test_sacct_unavailable_falls_back_to_squeue_once_warned(caplog):
    shell = ScriptedShell({"sacct": (1, "", "Slurm accounting storage is disabled"),
                           "squeue": (0, "11|RUNNING|None|2026-11-22T03:00:00\n12|COMPLETED|None|N/A\n", "")})
    b = SlurmBackend("x", ClusterProfile(), shell=shell)
    seen = b.poll(["11@/a.out", "12@/b.out", "13@/c.out"])
    assert seen["11@/a.out"].state == JobState.RUNNING and seen["12@/b.out"].state == JobState.COMPLETED
    assert "13@/c.out" not in seen  # unknown to both: no news, not a state change
    b.poll(["11@/a.out"])
    assert shell.calls == ["sacct", "squeue", "sacct", "squeue"]
    assert sum("falling back to squeue" in r.message for r in caplog.records) == 1


def test_failed_poll_is_no_news_for_the_tick(lab, app):
    from orchestrator.errors import BackendError

    class Down:
        def run(self, argv, env=None):
            raise BackendError("ssh login: Connection refused")

        def read(self, path, offset, max_bytes):
            raise BackendError("ssh login: Connection refused")

    (job,) = service.submit(app, spec(lab, "sleep 30"))
    before = service.job_detail(app, job)
    app.backend("slurm:lab").shell = Down()
    app.ticker.tick()
    after = service.job_detail(app, job)
    assert (after["state"], after["attempts"]) == (before["state"], before["attempts"])


def test_exit_status_reads_signals_as_a_shell_does():
    assert parse_exit("9:0", "137:0") == 137  # srun's task SIGKILLed (OOM killer): the step says 137
    assert parse_exit("9:0", "0:9") == 137
    assert parse_exit("0:9", "0:0") == 137
    assert parse_exit("3:0", "3:0") == 3
    assert parse_exit("0:0", "0:0") == 0
    assert parse_exit("0:0", "0:15") == 0  # requeued: the killed step of the run before counts no more
    assert parse_exit("garbage", "") is None


def test_profile_gpus_per_node_apply_when_the_spec_is_silent(home, tmp_path):
    prof = {**lab_profile(tmp_path), "gpus_per_node": 8, "cpus_per_task": 7, "vendor": "amd"}
    (home / "config.yaml").write_text(yaml.safe_dump({"clusters": {"lumi": prof}}))
    app = service.open_app({"ORCHD_HOME": str(home)})
    silent = write_spec(tmp_path, "name: s\nbackend: slurm\ncluster: lumi\ncommand: hostname\n", "s.yaml")
    explicit = write_spec(tmp_path, "name: e\nbackend: slurm\ncluster: lumi\ncommand: hostname\n"
                                    "resources: {gpus_per_node: 2}\n", "e.yaml")
    [a] = service.submit(app, silent, start_now=False)
    [b] = service.submit(app, explicit, start_now=False)
    with app.sessions() as s:
        from orchestrator.models import Job
        specs = {j.id: j.spec for j in s.query(Job)}
    assert (specs[a].resources.gpus_per_node, specs[a].resources.cpus_per_task) == (8, 7)
    assert (specs[b].resources.gpus_per_node, specs[b].resources.cpus_per_task) == (2, 7)
    backend = app.backend("slurm:lumi")
    from orchestrator.backends.base import SubmitRequest
    script = backend.render_script([SubmitRequest(a, 1, specs[a], tmp_path)], "/x.out")
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "amd GPUs, 8 per node" in script


def test_sigkilled_task_is_exit_137_and_retried(lab, app):
    s = spec(lab, "python -c 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'",
             extra='retry: {max_attempts: 2, backoff: 1s, on: ["exit:137"]}\n')
    [job] = service.submit(app, s)
    d = wait_job(app, job, done, 90, "the job to end")
    assert [a["exit_code"] for a in d["attempts"]] == [137, 137]
    assert d["reason"] == "RETRIES_EXHAUSTED" or d["state"] == "FAILED"


def test_two_daemons_two_homes_one_postgres_act_once(tmp_path, pg_url):
    """Two daemons with separate ORCHD_HOMEs on one PostgreSQL database and one SLURM: a 3-job
    sweep, each retried once (exit 3 on attempt 1) gets exactly 2 attempts, each sbatch'd once,
    and every logged value is recorded once."""
    from sqlalchemy import func, select

    from orchestrator.models import Action, MetricSample
    from tests.conftest import DATA, ROOT

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"clusters": {"lab": lab_profile(tmp_path)}}))
    envs = []
    for n in (1, 2):
        h = tmp_path / f"home{n}"
        h.mkdir()
        envs.append({**os.environ, "ORCHD_HOME": str(h), "ORCHD_DB_URL": pg_url, "ORCHD_CONFIG": str(cfg)})
    s = write_spec(tmp_path, f"""name: pg-sweep
backend: slurm
cluster: lab
command: python {DATA / 'fault_workload.py'} 5 0.3
env: {{SEED: "{{seed}}"}}
sweep: {{seed: [1, 2, 3]}}
retry: {{max_attempts: 3, backoff: 1s, on: ["exit:3"]}}
""")
    app = service.open_app(envs[0])
    ids = service.submit(app, s, start_now=False)
    daemons = [subprocess.Popen([os.sys.executable, "-m", "orchestrator.cli", "daemon", "--interval", "0.3"],
                                env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for e in envs]
    try:
        wait_for(lambda: all(service.job_state(app, j).terminal for j in ids), 180, interval=0.5,
                 what="the sweep to end under two daemons")
    finally:
        for d in daemons:
            d.terminate()
            d.wait(30)
    with app.sessions() as ses:
        for j in ids:
            d = service.job_detail(app, j)
            assert d["state"] == "COMPLETED" and len(d["attempts"]) == 2, (d["attempts"], d["actions"])
            kinds = [a["kind"] for a in d["actions"]]
            assert kinds.count("submit") + kinds.count("adopt") == 2, kinds
            for a in d["attempts"]:
                log = a["backend_id"].split("@", 1)[1]
                logged = [ln for ln in Path(log).read_text().splitlines() if "val_loss=" in ln]
                recorded = ses.scalar(select(func.count()).select_from(MetricSample).where(
                    MetricSample.job_id == j, MetricSample.attempt == a["number"]))
                assert recorded == len(logged) == 5, (j, a["number"], recorded, len(logged))
        assert ses.scalar(select(func.count()).select_from(Action).where(Action.kind == "retry")) == 3


def test_hostile_spec_and_orchd_secrets_on_the_real_cluster(lab, home, monkeypatch):
    """A job whose env values and name carry injections, submitted by an orchd whose environment
    holds API keys and the SMTP password: SLURM runs it with the values as data, and none of
    the secrets reaches the script, the job's environment, its log or the database."""
    secrets = {"VAST_API_KEY": "vast-secret-slurm", "RUNPOD_API_KEY": "runpod-secret-slurm",
               "ORCHD_SMTP_PASSWORD": "smtp-secret-slurm"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    app = service.open_app({"ORCHD_HOME": str(home)})
    marker = lab / "injected"
    s = write_spec(lab, f"""name: "x\\n#SBATCH --chdir=/\\ntouch {marker}-name"
backend: slurm
cluster: lab
command: env
env: {{EVIL: "$(touch {marker}-dollar)\\n#SBATCH --uid=0\\ntouch {marker}-newline", QUOTE: "it's \\"q\\""}}
""")
    [job] = service.submit(app, s)
    d = wait_job(app, job, done, 60, "the env job")
    assert d["state"] == "COMPLETED", d
    log = Path(d["attempts"][0]["backend_id"].split("@", 1)[1]).read_text()
    assert f"EVIL=$(touch {marker}-dollar)" in log and "QUOTE=it's \"q\"" in log
    assert not list(lab.glob("injected*"))
    script = service.attempt_script(app, job)
    job_info = subprocess.run(["scontrol", "show", "job", "-d", d["attempts"][0]["backend_id"].split("@")[0]],
                              env=SCTL, capture_output=True, text=True).stdout
    db = (home / "orchd.db").read_bytes()
    for v in secrets.values():
        assert v not in log and v not in script and v not in job_info and v.encode() not in db


def test_whatif_queue_wait_is_the_schedulers_estimate(app: service.App, lab: Path):
    """`orchd whatif`'s default queue wait on SLURM: sbatch --test-only's "to start at", which
    moves to when the job holding the nodes reaches its time limit."""
    from orchestrator.specfile import load_spec_file

    backend = app.backend("slurm:lab")
    (sp,) = [backend.complete(s) for s in load_spec_file(spec(lab, "true", nodes=2, limit="5m"))]
    assert backend.expected_wait(sp) < 60  # an idle cluster
    hold = subprocess.run(["sbatch", "--parsable", "-N2", "--exclusive", "-t", "30", "-p", "debug", "-o", "/dev/null",
                           "--wrap", "sleep 120"], env=SCTL, check=True, capture_output=True, text=True).stdout.strip()
    try:
        wait_for(lambda: subprocess.run(["squeue", "-h", "-j", hold, "-o", "%T"], env=SCTL, capture_output=True,
                                        text=True).stdout.strip() == "RUNNING", 30, what="the holding job to run")
        assert 29 * 60 - 5 <= backend.expected_wait(sp) <= 30 * 60 + 5
    finally:
        subprocess.run(["scancel", hold], env=SCTL, capture_output=True)
