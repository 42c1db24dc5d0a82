"""Cost accounting, budgets and email alerts, against a real SMTP server (aiosmtpd) and real
jobs on the local backend priced by the config (`local: {usd_per_hour: ...}`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import service
from orchestrator.costs import Scope, crossed, summarize
from orchestrator.errors import BudgetError
from orchestrator.models import Alert
from tests.conftest import wait_for, write_spec
from tests.smtp_server import SMTPServer

RATE = 72.0  # USD/hr = $0.02/s: budgets of cents fill in seconds


def configure(home: Path, smtp_port: int, **extra) -> None:
    cfg = {"local": {"usd_per_hour": RATE},
           "email": {"host": "127.0.0.1", "port": smtp_port, "security": "none", "user": "orchd",
                     "password_env": "ORCHD_TEST_SMTP_PASSWORD", "from": "orchd@lab", "to": ["team@lab"],
                     "on": ["failed", "success", "budget", "expectation"]}, **extra}
    (home / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture
def priced(home, smtp, monkeypatch) -> service.App:
    monkeypatch.setenv("ORCHD_TEST_SMTP_PASSWORD", "s3cret-pw")
    configure(home, smtp.port, budgets={"alerts_at": [0.5, 0.8, 1.0], "projects": {"p": {"max_usd": 0.16}}})
    return service.open_app({"ORCHD_HOME": str(home)})


def test_scope_fractions_and_summaries():
    sc = Scope("project", "p", 10.0, 100.0, usd=6.0, gpu_hours=90.0)
    assert sc.fraction == 0.9 and crossed(sc, [0.5, 0.8, 1.0]) == [0.5, 0.8]
    rows = [{"job": 1, "name": "a", "project": "p", "backend": "local", "day": "d", "usd": 1.0, "gpu_hours": 0},
            {"job": 2, "name": "b", "project": "p", "backend": "slurm:x", "day": "d", "usd": 2.5, "gpu_hours": 4}]
    by = summarize(rows, "backend")
    assert [r["backend"] for r in by] == ["local", "slurm:x", "TOTAL"] and by[-1]["usd"] == 3.5


def run_until_done(app: service.App, ids: list[int], timeout: float = 90) -> list[dict]:
    def check():
        app.ticker.tick(lock_timeout=5)
        app.flush_alerts()
        ds = [service.job_detail(app, i) for i in ids]
        return ds if all(d["ended_at"] for d in ds) else None

    return wait_for(check, timeout, interval=0.5, what="jobs to end")


@pytest.mark.slow
def test_sweep_stopped_at_project_budget_with_50_80_100_mails(priced, smtp, tmp_path):
    spec = write_spec(tmp_path, """name: spendy
project: p
command: python -m workloads.burgers --epochs {epochs} --step-delay 0.05
sweep: {epochs: [30, 31]}
""")
    ids = service.submit(priced, spec)
    ds = run_until_done(priced, ids)
    assert all(d["state"] == "CANCELLED" and d["reason"] == "BUDGET" for d in ds)
    spent = sum(d["cost_usd"] for d in ds)
    # stopped within one tick: at most one tick (0.5 s + the tick itself) of both jobs' spend over the limit
    assert 0.16 <= spent <= 0.16 + 2 * RATE / 3600 * 1.5, spent
    subjects = " | ".join(m["subject"] + m["body"] for m in smtp.inbox.messages)
    for pct in ("50%", "80%", "100%"):
        assert f"budget {pct} reached: project p" in subjects
    assert all(m["to"] == ["team@lab"] for m in smtp.inbox.messages)
    total = service.costs(priced, "project")[-1]
    assert abs(total["usd"] - spent) < 1e-9
    # a restarted orchd (new App on the same database) sends nothing again
    n = len(smtp.inbox.messages)
    again = service.open_app({"ORCHD_HOME": str(priced.settings.home)})
    again.ticker.tick()
    assert again.flush_alerts() == 0 and len(smtp.inbox.messages) == n


def test_projected_cost_refused_unless_forced(priced, tmp_path):
    spec = write_spec(tmp_path, "name: long\nproject: p\ncommand: 'sleep 60'\nresources: {time_limit: 1m}\n")
    with pytest.raises(BudgetError, match=r"projected \$1.20 .* project p: \$0.16 of \$0.16"):
        service.submit(priced, spec, start_now=False)
    assert service.job_summaries(priced, include_all=True) == []
    (job,) = service.submit(priced, spec, start_now=False, force=True)
    assert service.job_detail(priced, job)["state"] == "PENDING"


@pytest.mark.slow
def test_job_budget_and_failure_mail_carry_the_figures(priced, smtp, tmp_path):
    # the budget lasts 10 s: a val_loss every 5 steps comes ~2.5 s in (every 15: ~3 s), well before it ends
    spec = write_spec(tmp_path, """name: capped
command: python -m workloads.burgers --epochs 30 --step-delay 0.05 --eval-every 5
budget: {max_usd: 0.2}
notify: {email: [me@lab]}
""")
    (job,) = service.submit(priced, spec)
    (d,) = run_until_done(priced, [job])
    assert d["state"] == "CANCELLED" and d["reason"] == "BUDGET" and d["cost_usd"] <= 0.2 + RATE / 3600 * 1.5
    # one mail per threshold, or a digest of them when several crossed between two sends
    body = "\n".join(m["subject"] + "\n" + m["body"] for m in smtp.inbox.messages if m["to"] == ["me@lab"])
    assert f"[orchd] job {job} capped: budget 100% reached: job {job}: $0.2" in body
    assert f"Job {job} capped on local: CANCELLED (BUDGET)" in body and f"orchd show {job}" in body
    assert f"Cost so far: ${d['cost_usd']:.2f}" in body, body
    assert "val_loss=" in body, body


def test_smtp_down_keeps_alerts_and_retries_later(home, monkeypatch, tmp_path):
    monkeypatch.setenv("ORCHD_TEST_SMTP_PASSWORD", "s3cret-pw")
    server = SMTPServer()
    configure(home, server.port)  # nothing listens yet
    app = service.open_app({"ORCHD_HOME": str(home)})
    (job,) = service.submit(app, write_spec(tmp_path, "name: boom\ncommand: 'exit 3'\n"))
    wait_for(lambda: (app.ticker.tick(), service.job_detail(app, job)["ended_at"])[1], 20, what="job end")
    assert app.flush_alerts() == 0  # refused connection: kept, not lost, tick unaffected
    with app.sessions() as s:
        (alert,) = s.query(Alert).all()
        assert alert.sent_at is None and alert.tries == 1 and "Connection" in alert.last_error
        assert alert.next_try_at > time.time() + 20  # backoff
        s.query(Alert).update({"next_try_at": 0})
        s.commit()
    server.start()
    try:
        assert app.flush_alerts() == 1
        (m,) = server.inbox.messages
        assert m["subject"] == f"[orchd] job {job} boom: FAILED: NONZERO_EXIT" and "exit 3" in m["body"]
        assert server.inbox.logins == [("orchd", "s3cret-pw")]
    finally:
        server.stop()
    db = (home / "orchd.db").read_bytes() + b"".join(p.read_bytes() for p in home.glob("orchd.db-*"))
    assert b"s3cret-pw" not in db  # the password never reaches the database


def test_many_alerts_at_once_make_one_digest(priced, smtp, tmp_path):
    for i in range(4):
        (job,) = service.submit(priced, write_spec(tmp_path, f"name: f{i}\ncommand: 'exit 1'\n", f"f{i}.yaml"),
                                start_now=False)
    wait_for(lambda: (priced.ticker.tick(), all(r["state"] == "FAILED" for r in
                                                 service.job_summaries(priced)))[1], 20, what="all failed")
    assert priced.flush_alerts() == 1
    (m,) = smtp.inbox.messages
    assert m["subject"] == "[orchd] 4 alerts: failed" and m["body"].count("== [orchd] job") == 4


def test_costs_cli(orchd, priced, tmp_path):
    (job,) = service.submit(priced, write_spec(tmp_path, "name: c\ncommand: 'sleep 1'\n"))
    wait_for(lambda: (priced.ticker.tick(), service.job_detail(priced, job)["ended_at"])[1], 20, what="end")
    rows = json.loads(orchd("costs", "--by", "job", "--json").stdout)
    assert rows[0]["job"] == job and 0.02 * 0.9 <= rows[0]["usd"] <= 0.02 * 3 and rows[-1]["job"] == "TOTAL"
    assert "TOTAL" in orchd("costs", "--by", "day").stdout
