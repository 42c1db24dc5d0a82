"""orchd end to end on the local backend with real PyTorch training (workloads/)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from sqlalchemy import select

from orchestrator import service
from orchestrator.models import Action, Attempt, KeysReport
from orchestrator.states import JobState
from tests.conftest import ROOT, group_alive, wait_for, write_spec

pytestmark = pytest.mark.slow


def show(orchd, job: int) -> dict:
    return json.loads(orchd("show", str(job), "--json").stdout)


def test_main_job_completes_with_val_loss_series(orchd):
    p = orchd("submit", "jobspecs/sota_push_v2.yaml", "--wait")
    job = int(p.stdout.split()[0])
    d = show(orchd, job)
    assert d["state"] == "COMPLETED" and d["reason"] == "SUCCESS"
    steps = [pt["step"] for pt in d["metrics"]["val_loss"]]
    assert steps == list(range(15, 271, 15))  # every evaluation, once
    assert min(pt["value"] for pt in d["metrics"]["val_loss"]) < 0.34
    kinds = [a["kind"] for a in d["actions"]]
    assert kinds[0] == "submit" and "expectation_met" in kinds and "success" in kinds and kinds[-1] == "finish"
    (row,) = json.loads(orchd("status", "--json").stdout)
    assert row["id"] == job and row["state"] == "COMPLETED" and row["attempts"] == 1 and row["cost_usd"] == 0
    assert set(row["metrics"]) >= {"val_loss", "train_loss", "nrmse"}
    assert "sota_push_v2" in orchd("status").stdout


def test_bad_checkpoint_cancelled_in_the_tick_that_reads_it(app: service.App, orchd):
    job = int(orchd("submit", "jobspecs/topoflow_bad_checkpoint.yaml", "--wait", check=False).stdout.split()[0])
    d = show(orchd, job)
    assert d["state"] == "FAILED" and d["reason"] == "BAD_CHECKPOINT"
    assert "38 missing keys, expected exactly 2" in d["detail"]
    assert d["attempts"][0]["state"] == "CANCELLED"
    with app.sessions() as s:
        first_report = s.scalars(select(KeysReport).where(KeysReport.job_id == job).order_by(KeysReport.id)).first()
        cancel = s.scalars(select(Action).where(Action.job_id == job, Action.kind == "cancel")).one()
    assert cancel.at == first_report.at  # the same tick that read the line cancelled the job
    log = orchd("logs", str(job)).stdout
    assert "Missing keys: 38" in log and "step 1350/1350" not in log  # stopped long before the end


def test_good_finetune_expects_exactly_its_new_keys(orchd):
    job = int(orchd("submit", "jobspecs/topoflow_finetune.yaml", "--wait").stdout.split()[0])
    d = show(orchd, job)
    assert d["state"] == "COMPLETED"
    assert sorted(d["missing_keys"]) == sorted(["climax.blocks.0.attn.elevation_alpha",
                                                "climax.blocks.0.attn.H_scale"])
    assert d["unexpected_keys"] == [] and d["unexpected_keys_count"] == 0


def test_transient_failure_retried_with_backoff_then_succeeds(app: service.App, orchd):
    job = int(orchd("submit", "jobspecs/burgers_flaky.yaml", "--wait").stdout.split()[0])
    d = show(orchd, job)
    assert d["state"] == "COMPLETED"
    a1, a2 = d["attempts"]
    assert (a1["state"], a1["exit_code"], a2["state"], a2["exit_code"]) == ("FAILED", 137, "COMPLETED", 0)
    assert a2["submitted_at"] - a1["ended_at"] >= 2.0  # backoff: 2s
    assert "resumed from checkpoint" in orchd("logs", str(job)).stdout
    retry = [a for a in d["actions"] if a["kind"] == "retry"]
    assert len(retry) == 1 and "matches retry.on 'exit:137'" in retry[0]["reason"]
    # attempt 2 resumed at step 30: the series has 30 from attempt 1 and 45.. from attempt 2
    pts = [(p["attempt"], p["step"]) for p in d["metrics"]["val_loss"]]
    assert pts[:2] == [(1, 15), (1, 30)] and pts[2] == (2, 45)


def test_daemon_kill_9_loses_nothing(env, orchd, app: service.App, tmp_path):
    daemon_log = tmp_path / "daemon.log"

    def start_daemon() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon", "--interval", "1"], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(daemon_log, "a"))

    def progress() -> tuple[str, int]:
        d = service.job_detail(app, job)
        return d["state"], len(d["metrics"].get("val_loss", []))

    daemon = start_daemon()
    try:
        job = int(orchd("submit", "jobspecs/sota_push_v2.yaml").stdout.split()[0])
        wait_for(lambda: progress()[1] >= 3, 90, what=f"first metrics; daemon log: {daemon_log}")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert progress()[0] == "RUNNING"  # the training survived its daemon
        daemon = start_daemon()
        wait_for(lambda: JobState(progress()[0]).terminal, 120, interval=0.5, what="job end")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0  # clean stop on SIGTERM
    d = show(orchd, job)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1
    assert [p["step"] for p in d["metrics"]["val_loss"]] == list(range(15, 271, 15))  # none lost, none twice


def test_two_polls_at_once_act_once(tmp_path, app: service.App, orchd):
    spec = write_spec(tmp_path, "name: sleeper\ncommand: sleep 30\n")
    (job,) = service.submit(app, spec, start_now=False)
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(orchd("poll"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with app.sessions() as s:
        assert len(s.scalars(select(Attempt).where(Attempt.job_id == job)).all()) == 1
        assert len(s.scalars(select(Action).where(Action.job_id == job, Action.kind == "submit")).all()) == 1
    assert "cancelled" in orchd("cancel", str(job)).stdout
    d = show(orchd, job)
    assert d["state"] == "CANCELLED" and d["attempts"][0]["state"] == "CANCELLED"


def test_sweep_runs_one_job_per_combination(orchd):
    ids = [int(x) for x in orchd("submit", "jobspecs/burgers_sweep.yaml", "--wait").stdout.split()]
    assert len(ids) == 2
    details = [show(orchd, i) for i in ids]
    assert all(d["state"] == "COMPLETED" for d in details)
    assert [d["command"].split("--depths ")[1][:5] for d in details] == ["1 1 1", "2 2 2"]


def test_cancel_while_running_stops_the_training(orchd, env):
    job = int(orchd("submit", "jobspecs/sota_push_v2.yaml").stdout.split()[0])
    d = show(orchd, job)
    run_dir = d["attempts"][0]["backend_id"]
    pgid = json.loads(open(os.path.join(run_dir, "runner.json")).read())["pgid"]
    orchd("cancel", str(job))
    assert show(orchd, job)["state"] == "CANCELLED"
    assert group_alive(pgid) is False
