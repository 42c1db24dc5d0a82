"""Fault injection: exactly once under ``kill -9``, hostile logs, poison alerts, cancels that
die half way, two ticking processes. Each test reproduces a case of issue #9 and checks what a
person walking away relies on: every attempt ran once, every logged value recorded once, no
process left behind, every alert mailed once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from orchestrator import service
from orchestrator.backends.local import attempt_processes
from orchestrator.models import Action, Alert, Attempt, Job, MetricSample
from tests.conftest import DATA, ROOT, wait_for, write_spec
from tests.smtp_server import SMTPServer

pytestmark = pytest.mark.faults
WORKLOAD = DATA / "fault_workload.py"


@pytest.fixture
def smtp():
    server = SMTPServer().start()
    yield server
    server.stop()


def mail_config(home: Path, port: int, **extra) -> None:
    cfg = {"email": {"host": "127.0.0.1", "port": port, "security": "none", "from": "orchd@lab",
                     "to": ["team@lab"], "on": ["failed", "success"], "digest_after": 1000}, **extra}
    (home / "config.yaml").write_text(yaml.safe_dump(cfg))


def cli(env: dict[str, str], *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)


def log_values(log: Path) -> list[str]:
    """The val_loss lines an attempt's log really holds (what orchd must have recorded, once each)."""
    return [ln for ln in log.read_text().splitlines() if "val_loss=" in ln] if log.exists() else []


def check_exactly_once(app: service.App, home: Path) -> dict[str, int]:
    """Every attempt ran once and alone, every val_loss line recorded once, nothing left running."""
    counts = {"attempts": 0, "samples": 0}
    with app.sessions() as s:
        for job in s.scalars(select(Job)):
            runs_file = home / "jobs" / str(job.id) / "runs.txt"
            runs = runs_file.read_text().splitlines() if runs_file.exists() else []
            numbers = [int(r.split()[0]) for r in runs]
            assert len(numbers) == len(set(numbers)), f"job {job.id}: an attempt ran twice: {runs}"
            assert not [r for r in runs if "OVERLAP" in r], f"job {job.id}: attempts overlapped: {runs}"
            started = {a.number for a in job.attempts if a.backend_id}
            assert set(numbers) <= started, f"job {job.id}: ran {numbers}, orchd knows {started}"
            for a in job.attempts:
                counts["attempts"] += 1
                recorded = s.scalar(select(func.count()).select_from(MetricSample).where(
                    MetricSample.job_id == job.id, MetricSample.attempt == a.number, MetricSample.name == "val_loss"))
                logged = log_values(home / "jobs" / str(job.id) / f"a{a.number}" / "output.log")
                assert recorded == len(logged), f"job {job.id} attempt {a.number}: {recorded} recorded, " \
                                                f"{len(logged)} logged"
                counts["samples"] += recorded
                if a.backend_id:
                    assert not attempt_processes(Path(a.backend_id)), f"orphan of job {job.id} a{a.number}"
    return counts


def test_random_kill9_over_a_retried_sweep(tmp_path, home, env, smtp):
    """kill -9 of daemon, poll, submit --wait, cancel and runners at random moments over a
    retried sweep: 0 duplicate runs, 0 lost or duplicated samples, 0 orphans, 0 duplicate mails."""
    mail_config(home, smtp.port)
    spec = write_spec(tmp_path, f"""name: kills
command: python {WORKLOAD} 8 0.25
env: {{SEED: "{{seed}}"}}
sweep: {{seed: [1, 2, 3, 4, 5]}}
max_parallel: 3
success: "val_loss < 0.5"
retry: {{max_attempts: 4, backoff: 1s, factor: 1, on: ["exit:3", FAILED]}}
""")
    rng = random.Random(int(os.environ.get("ORCHD_FAULT_SEED", "9")))
    injected = {"daemon": 0, "poll": 0, "submit": 0, "cancel": 0, "runner": 0}
    procs: list[subprocess.Popen] = []
    first = cli(env, "submit", str(spec), "--wait")
    time.sleep(rng.uniform(0.8, 2.0))
    first.kill()
    injected["submit"] += 1
    first.wait()
    app = service.open_app(env)
    with app.sessions() as s:
        job_ids = sorted(s.scalars(select(Job.id)))
    if not job_ids:  # killed before the jobs were recorded: submit again, undisturbed
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(spec)], env=env, cwd=ROOT,
                       check=True, capture_output=True)
        with app.sessions() as s:
            job_ids = sorted(s.scalars(select(Job.id)))
    cancelled = job_ids[-1]
    deadline = time.time() + 150
    while sum(injected.values()) < 60 and time.time() < deadline:
        what = rng.choices(["daemon", "poll", "cancel", "runner"], [50, 30, 6, 14])[0]
        if what == "runner":
            runners = [json.loads(p.read_text())["runner_pid"] for p in home.glob("jobs/*/a*/runner.json")
                       if not (p.parent / "result.json").exists()]
            if runners:
                try:
                    os.kill(rng.choice(runners), signal.SIGKILL)
                    injected["runner"] += 1
                except ProcessLookupError:
                    pass
            time.sleep(rng.uniform(0.1, 0.6))
            continue
        args = {"daemon": ["daemon", "--interval", "0.2"], "poll": ["poll"], "cancel": ["cancel", str(cancelled)]}
        p = cli(env, *args[what])
        procs.append(p)
        if rng.random() < 0.3:  # sometimes two at once: a cron poll beside a daemon
            procs.append(cli(env, "poll"))
        time.sleep(rng.uniform(0.05, 1.6))
        for q in procs:
            if q.poll() is None:
                q.kill()
                injected["daemon" if q.args[3] == "daemon" else q.args[3]] += 1
            q.wait()
        procs.clear()
    print(f"\ninjected kill -9: {injected} ({sum(injected.values())} in all)")
    assert sum(injected.values()) >= 50
    # then undisturbed: a daemon and a cron poll side by side until every job has ended
    daemon = cli(env, "daemon", "--interval", "0.3")
    try:
        def done() -> bool:
            subprocess.run([sys.executable, "-m", "orchestrator.cli", "poll"], env=env, cwd=ROOT, capture_output=True)
            return all(service.job_state(app, j).terminal for j in job_ids)

        wait_for(done, 240, interval=0.5, what="every job of the sweep to end")
        wait_for(lambda: app.flush_alerts() == 0 and _unsent(app) == 0, 30, what="the outbox to drain")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    counts = check_exactly_once(app, home)
    with app.sessions() as s:
        alerts = list(s.scalars(select(Alert).where(Alert.sent_at.is_not(None))))
        cancel_job = s.get(Job, cancelled)
        states = {j.id: (j.state, j.reason, len(j.attempts)) for j in s.scalars(select(Job))}
        adopted = s.scalar(select(func.count()).select_from(Action).where(Action.kind == "adopt"))
    subjects = [m["subject"] for m in smtp.inbox.messages]
    assert len(subjects) == len(set(subjects)) == len(alerts), f"duplicate mails: {subjects}"
    if cancel_job.cancel_requested_at is not None:  # some cancel got as far as recording its intent
        assert (cancel_job.state, cancel_job.reason) == ("CANCELLED", "USER")
        with app.sessions() as s:
            later = s.scalar(select(func.count()).select_from(Attempt).where(
                Attempt.job_id == cancelled, Attempt.submitting_at > cancel_job.cancel_requested_at))
        assert later == 0, "an attempt was started after the job was cancelled"
    print(f"jobs: {states}; attempts {counts['attempts']} ({adopted} found started and adopted), "
          f"samples {counts['samples']}, mails {len(subjects)}")
    for j, (state, reason, _) in states.items():
        assert state in ("COMPLETED", "CANCELLED", "FAILED"), (j, state, reason)


def _unsent(app: service.App) -> int:
    with app.sessions() as s:
        return s.scalar(select(func.count()).select_from(Alert).where(Alert.sent_at.is_(None),
                                                                         Alert.failed_at.is_(None)))
