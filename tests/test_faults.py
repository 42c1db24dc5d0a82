"""Fault injection: exactly once under ``kill -9``, hostile logs, poison alerts, cancels that
die half way, two ticking processes. Each test reproduces a case of issue #9 and checks what a
person walking away relies on: every attempt ran once, every logged value recorded once, no
process left behind, every alert mailed once."""

from __future__ import annotations

import json
import os
import random
import signal
import smtplib
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

pytestmark = pytest.mark.faults
WORKLOAD = DATA / "fault_workload.py"


def mail_config(home: Path, port: int, **extra) -> None:
    cfg = {"email": {"host": "127.0.0.1", "port": port, "security": "none", "from": "orchd@lab",
                     "to": ["team@lab"], "on": ["failed", "success"], "digest_after": 1000}, **extra}
    (home / "config.yaml").write_text(yaml.safe_dump(cfg))


def cli(env: dict[str, str], *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)


def assert_one_message_per_alert(messages: list[dict]) -> int:
    """Each alert arrived as one message: a subject comes under one Message-ID, and a repeat of a
    Message-ID (a process killed after the server took it, before it was recorded sent) is the
    very same message, which a mail client can tell for a repeat."""
    by_id: dict[str, list[dict]] = {}
    for m in messages:
        by_id.setdefault(m["message_id"], []).append(m)
    for mid, copies in by_id.items():
        assert mid.startswith("<") and mid.endswith("@lab>"), mid
        assert all((c["subject"], c["body"], c["to"]) == (copies[0]["subject"], copies[0]["body"], copies[0]["to"])
                   for c in copies), f"{mid} carried different messages"
    assert len(by_id) == len({m["subject"] for m in messages}), f"duplicate mails: {messages}"
    return len(messages) - len(by_id)  # the repeats


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
command: python {WORKLOAD} 12 0.6
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
    deadline = time.time() + 150
    turn = 0
    while sum(injected.values()) < 60 and time.time() < deadline:
        turn += 1  # a cancel and runner kills on a fixed beat, the rest at random
        what = ("cancel" if turn in (9, 23) else "runner" if turn % 10 == 4
                else rng.choices(["daemon", "poll"], [60, 40])[0])
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
        if what == "cancel":
            with app.sessions() as ses:
                running = sorted(ses.scalars(select(Job.id).where(Job.state == "RUNNING")))
            if not running:
                continue
            p = cli(env, "cancel", str(rng.choice(running)))
            time.sleep(rng.uniform(0.7, 1.2))  # past the CLI's start-up: into the cancel itself
            if p.poll() is None:
                p.kill()
                injected["cancel"] += 1
            p.wait()
            continue
        args = {"daemon": ["daemon", "--interval", "0.2"], "poll": ["poll"]}
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
        cancel_jobs = list(s.scalars(select(Job).where(Job.cancel_requested_at.is_not(None))))
        states = {j.id: (j.state, j.reason, len(j.attempts)) for j in s.scalars(select(Job))}
        adopted = s.scalar(select(func.count()).select_from(Action).where(Action.kind == "adopt"))
    subjects = [m["subject"] for m in smtp.inbox.messages]
    assert len(set(subjects)) == len(alerts), f"mails {subjects} for {len(alerts)} alerts"
    repeats = assert_one_message_per_alert(smtp.inbox.messages)
    for cancel_job in cancel_jobs:  # every cancel that got as far as recording its intent
        assert (cancel_job.state, cancel_job.reason) == ("CANCELLED", "USER")
        with app.sessions() as s:
            later = s.scalar(select(func.count()).select_from(Attempt).where(
                Attempt.job_id == cancel_job.id, Attempt.submitting_at > cancel_job.cancel_requested_at))
        assert later == 0, "an attempt was started after the job was cancelled"
    print(f"jobs: {states}; attempts {counts['attempts']} ({adopted} found started and adopted), "
          f"samples {counts['samples']}, mails {len(subjects)} ({repeats} sent again after a kill)")
    for j, (state, reason, _) in states.items():
        assert state in ("COMPLETED", "CANCELLED", "FAILED"), (j, state, reason)


def _unsent(app: service.App) -> int:
    with app.sessions() as s:
        return s.scalar(select(func.count()).select_from(Alert).where(Alert.sent_at.is_(None),
                                                                         Alert.failed_at.is_(None)))


def tick_until(app: service.App, job_ids: list[int], timeout: float = 60) -> None:
    def done() -> bool:
        app.ticker.tick(lock_timeout=5)
        return all(service.job_state(app, j).terminal for j in job_ids)

    wait_for(done, timeout, interval=0.2, what="jobs to end")


def test_submit_killed_between_start_and_record_is_adopted_not_rerun(app, home, tmp_path, monkeypatch):
    """The runner started, then orchd died before committing it: the next tick (another
    process, here a fresh App) finds the started attempt instead of starting it again."""
    spec = write_spec(tmp_path, f"name: once\ncommand: python {WORKLOAD} 4 0.1\nretry: {{max_attempts: 1}}\n")
    [job] = service.submit(app, spec, start_now=False)
    backend = app.backend("local")
    real_submit = backend.submit

    def submit_then_die(req):
        real_submit(req)
        raise KeyboardInterrupt("kill -9 stand-in: nothing after the start is committed")

    monkeypatch.setattr(backend, "submit", submit_then_die)
    with pytest.raises(KeyboardInterrupt):
        app.ticker.tick()
    other = service.open_app({"ORCHD_HOME": str(home)})  # a new process: nothing in memory
    tick_until(other, [job])
    d = service.job_detail(other, job)
    assert [a["kind"] for a in d["actions"]].count("adopt") == 1
    assert "submit" not in [a["kind"] for a in d["actions"]]
    check_exactly_once(other, home)
    assert len((home / "jobs" / str(job) / "runs.txt").read_text().splitlines()) == 1


def test_70mb_log_is_read_to_its_end_before_the_job_ends(app, tmp_path):
    """A job that prints 70 MB of debug output and then its result: the tick reads at most 64 MB,
    and the job is finished only once the rest is read (before: FAILED EXPECTATION)."""
    cmd = ("python -c \"import sys; sys.stdout.write(('debug ' + 'x' * 93 + chr(10)) * 700000); "
           "print('step 9 val_loss=0.10')\"")
    spec = write_spec(tmp_path, f"name: chatty\ncommand: {json.dumps(cmd)}\nsuccess: \"val_loss < 0.2\"\n")
    [job] = service.submit(app, spec)
    wait_for(lambda: (Path(service.job_detail(app, job)["attempts"][0]["backend_id"]) / "result.json").exists(),
             60, what="the job to exit")
    r = app.ticker.tick()
    assert r.bytes_read == 64 << 20
    assert service.job_detail(app, job)["state"] == "RUNNING"
    assert service.job_detail(app, job)["detail"].startswith("FINISHING")
    tick_until(app, [job])
    d = service.job_detail(app, job)
    assert (d["state"], d["reason"]) == ("COMPLETED", "SUCCESS")
    assert [p["value"] for p in d["metrics"]["val_loss"]] == [0.10]
    assert d["attempts"][0]["log_offset"] == 70_000_000 + len("step 9 val_loss=0.10\n")


@pytest.mark.parametrize("path", ["fast path", "ORM pass"])
def test_a_chatty_log_is_read_in_bounded_ticks_every_sample_once(app, tmp_path, monkeypatch, path):
    """A log with 60,000 metric lines beside a quiet job: each tick records at most its bound of
    samples from the chatty one (plus the chunk that crossed it), the quiet job's value is read
    in the first tick all the same, and over the next ticks every sample is recorded exactly
    once, in order: on the tick's fast path (orchestrator/quiet.py) as on its ORM pass."""
    import orchestrator.logread as logread

    monkeypatch.setattr(logread, "MAX_SAMPLES_PER_TICK", 20_000)
    monkeypatch.setattr(logread, "READ_CHUNK", 256 << 10)
    if path == "ORM pass":
        app.ticker.fast_path = None
    [chatty] = service.submit(app, write_spec(tmp_path, "name: chatty\ncommand: sleep 60\n"))
    [quiet] = service.submit(app, write_spec(tmp_path, "name: quiet\ncommand: sleep 60\n", "quiet.yaml"))
    logs = {j: Path(service.job_detail(app, j)["attempts"][0]["backend_id"]) / "output.log" for j in (chatty, quiet)}
    logs[chatty].write_text("".join(f"step {i} val_loss={1 / i:.6f}\n" for i in range(1, 60_001)))
    logs[quiet].write_text("step 1 val_loss=0.5\n")
    counts = []
    for _ in range(6):
        assert app.ticker.tick().quiet == (2 if path == "fast path" else 0)
        with app.sessions() as s:
            counts.append(s.scalar(select(func.count()).where(MetricSample.job_id == chatty)))
            if len(counts) == 1:
                assert s.scalar(select(func.count()).where(MetricSample.job_id == quiet)) == 1  # not starved
    per_tick = [b - a for a, b in zip([0, *counts], counts, strict=False)]
    assert 0 < per_tick[0] < 20_000 + 256 * 1024 // 20, per_tick  # the bound, plus one chunk's lines
    assert counts[-1] == 60_000, per_tick
    with app.sessions() as s:
        steps = s.scalars(select(MetricSample.step).where(MetricSample.job_id == chatty)
                          .order_by(MetricSample.id)).all()
    assert steps == list(range(1, 60_001))
    for j in (chatty, quiet):
        service.cancel(app, j)


@pytest.mark.parametrize("path", ["fast path", "ORM pass"])
@pytest.mark.parametrize("how", ["shrunk", "rewritten longer"])
def test_shrunk_or_rewritten_log_is_read_again_from_its_start(app, tmp_path, how, path):
    """A log truncated under orchd is read again from its start: shorter than the offset read
    (rotation), or already longer again by the next read (SLURM's requeue truncates the output
    file; a program that reopens its log with "w"), which only the bytes before the offset tell."""
    if path == "ORM pass":
        app.ticker.fast_path = None
    spec = write_spec(tmp_path, "name: rotating\ncommand: sleep 30\n")
    [job] = service.submit(app, spec)
    run_dir = Path(service.job_detail(app, job)["attempts"][0]["backend_id"])
    (run_dir / "output.log").write_text("".join(f"step {i} val_loss={1 / i:.3f}\n" for i in range(1, 6)))
    app.ticker.tick()
    if how == "shrunk":
        again = [6]
        (run_dir / "output.log").write_text("step 6 val_loss=0.150\n")  # truncated and rewritten (rotation)
    else:
        again = list(range(1, 10))  # the run restarted, its log 9 lines long by the next tick
        (run_dir / "output.log").write_text("".join(f"step {i} val_loss={0.9 / i:.4f}\n" for i in again))
    app.ticker.tick()
    d = service.job_detail(app, job)
    assert [p["step"] for p in d["metrics"]["val_loss"]] == [1, 2, 3, 4, 5, *again]
    [reset] = [a for a in d["actions"] if a["kind"] == "log_reset"]
    assert ("shrank" if how == "shrunk" else "rewritten in place") in reset["reason"], reset
    app.ticker.tick()  # read on from the new end, nothing twice
    assert len(service.job_detail(app, job)["metrics"]["val_loss"]) == 5 + len(again)
    service.cancel(app, job)


@pytest.mark.parametrize("bad", ["directory", "fifo", "broken spec"])
def test_one_bad_job_never_stops_the_others(app, home, tmp_path, bad):
    """A log that is a directory or a FIFO, or a spec the database cannot give back: that job
    fails with ORCHD_ERROR after 3 ticks; the job after it runs to COMPLETED meanwhile; nothing blocks."""
    [broken] = service.submit(app, write_spec(tmp_path, "name: broken\ncommand: sleep 20\n", "a.yaml"))
    run_dir = Path(service.job_detail(app, broken)["attempts"][0]["backend_id"])
    if bad == "broken spec":
        with app.sessions.begin() as s:
            s.get(Job, broken).spec_json = '{"name": "broken", "command": 42}'
    else:
        log = run_dir / "output.log"
        log.unlink()
        os.mkdir(log) if bad == "directory" else os.mkfifo(log)
    [fine] = service.submit(app, write_spec(tmp_path, f"name: fine\ncommand: python {WORKLOAD} 3 0.05\n"
                                            "retry: {max_attempts: 1}\n", "b.yaml"), start_now=False)
    # attempt 1 of `fine` exits 3: it ends FAILED, NONZERO_EXIT, on its own
    t0 = time.time()
    tick_until(app, [broken, fine], timeout=60)
    assert time.time() - t0 < 60
    d = service.job_detail(app, broken)
    assert (d["state"], d["reason"]) == ("FAILED", "ORCHD_ERROR")
    assert [a["kind"] for a in d["actions"]].count("orchd_error") == 3
    assert service.job_detail(app, fine)["reason"] == "NONZERO_EXIT"
    assert not attempt_processes(run_dir)


def test_poison_alert_is_marked_failed_and_two_senders_mail_once(app, home, smtp, tmp_path):
    mail_config(home, smtp.port)
    app = service.open_app({"ORCHD_HOME": str(home)})
    now = time.time()
    with app.sessions.begin() as s:
        for i in range(6):
            s.add(Alert(key=f"k{i}", kind="failed", recipients=json.dumps(["team@lab"]), subject=f"alert {i}",
                        body="b", created_at=now, tries=0, next_try_at=0, last_error=""))
        s.add(Alert(key="poison", kind="failed", recipients=json.dumps(["team@lab\nBcc: x@evil"]),
                    subject="poison", body="b", created_at=now, tries=0, next_try_at=0, last_error=""))
    apps = [service.open_app({"ORCHD_HOME": str(home)}) for _ in range(2)]
    threads = [threading.Thread(target=a.flush_alerts) for a in apps for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    app.flush_alerts()
    app.flush_alerts()
    subjects = sorted(m["subject"] for m in smtp.inbox.messages)
    assert subjects == [f"alert {i}" for i in range(6)]
    with app.sessions() as s:
        poison = s.scalar(select(Alert).where(Alert.key == "poison"))
    assert poison.sent_at is None and poison.failed_at is not None and "cannot build" in poison.last_error


# an outbox flush killed (-9) the moment the SMTP server has taken a message, before it is recorded
_KILLED_AFTER_THE_SERVER_TOOK_IT = """
import os, smtplib, sys
from orchestrator import service

send = smtplib.SMTP.send_message

def killed(self, msg, *args, **kwargs):
    send(self, msg, *args, **kwargs)
    os.kill(os.getpid(), 9)

smtplib.SMTP.send_message = killed
service.open_app({"ORCHD_HOME": sys.argv[1]}).flush_alerts()
"""


@pytest.mark.parametrize("digest", [False, True])
def test_outbox_killed_after_the_server_took_a_mail_sends_that_same_message_again(home, smtp, digest):
    """``kill -9`` between the SMTP server's 250 and the commit of ``sent_at``: whether it arrived
    is unknown to orchd, so the next flush sends it again, as the same message (Message-ID,
    subject, body; a digest the same alerts), and once recorded sent, never a third time."""
    mail_config(home, smtp.port, email={"host": "127.0.0.1", "port": smtp.port, "security": "none",
                                         "from": "orchd <orchd@lab>", "to": ["team@lab"],
                                         "digest_after": 2 if digest else 1000})
    app = service.open_app({"ORCHD_HOME": str(home)})
    with app.sessions.begin() as s:
        for i in range(3):
            s.add(Alert(key=f"k{i}", kind="failed", recipients=json.dumps(["team@lab"]), subject=f"alert {i}",
                        body=f"body {i}", created_at=0, tries=0, next_try_at=0, last_error=""))
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_THE_SERVER_TOOK_IT, str(home)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    [first] = smtp.inbox.messages
    with app.sessions() as s:  # claimed, not recorded sent
        claimed = list(s.scalars(select(Alert).where(Alert.message_id == first["message_id"])))
        assert [a.sent_at for a in claimed] == [None] * (3 if digest else 1)
    # a new alert meanwhile goes in a message of its own, not into the claimed one
    with app.sessions.begin() as s:
        s.add(Alert(key="k3", kind="success", recipients=json.dumps(["team@lab"]), subject="alert 3",
                    body="body 3", created_at=0, tries=0, next_try_at=0, last_error=""))
    assert app.flush_alerts() == (2 if digest else 4)
    assert app.flush_alerts() == 0
    messages = smtp.inbox.messages
    assert_one_message_per_alert(messages)
    again = [m for m in messages[1:] if m["message_id"] == first["message_id"]]
    assert again == [first]
    assert len(messages) == (3 if digest else 5)
    with app.sessions() as s:
        assert all(a.sent_at is not None for a in s.scalars(select(Alert)))


def test_a_mail_the_server_took_is_sent_even_if_its_goodbye_fails(home, smtp, monkeypatch):
    """The server took the mail (250) and then answered QUIT with an error: the mail is recorded
    sent, not retried (which would deliver it twice) nor counted as failed."""
    mail_config(home, smtp.port)
    app = service.open_app({"ORCHD_HOME": str(home)})
    with app.sessions.begin() as s:
        s.add(Alert(key="k", kind="failed", recipients=json.dumps(["team@lab"]), subject="alert", body="b",
                    created_at=0, tries=0, next_try_at=0, last_error=""))

    def rude_goodbye(self, *exc):
        self.close()
        raise smtplib.SMTPResponseException(421, b"closing")

    monkeypatch.setattr(smtplib.SMTP, "__exit__", rude_goodbye)
    assert app.flush_alerts() == 1
    assert app.flush_alerts() == 0
    assert len(smtp.inbox.messages) == 1
    with app.sessions() as s:
        a = s.scalar(select(Alert))
    assert a.sent_at is not None and (a.tries, a.last_error) == (1, "")


def test_job_name_with_newline_makes_a_clean_subject(app, home, smtp, tmp_path):
    mail_config(home, smtp.port)
    app = service.open_app({"ORCHD_HOME": str(home)})
    spec = write_spec(tmp_path, 'name: "evil\\nBcc: x@evil"\ncommand: "exit 1"\n')
    [job] = service.submit(app, spec)
    tick_until(app, [job])
    assert app.flush_alerts() == 1
    [m] = smtp.inbox.messages
    assert m["to"] == ["team@lab"] and "evil Bcc: x@evil" in m["subject"]


def test_cancel_killed_halfway_is_finished_by_the_next_tick_and_never_retried(app, env, home, tmp_path):
    spec = write_spec(tmp_path, "name: stop-me\ncommand: sleep 60\n"
                                "retry: {max_attempts: 3, backoff: 1s, on: [CANCELLED, FAILED]}\n")
    [job] = service.submit(app, spec)
    p = cli(env, "cancel", str(job))

    def intent() -> bool:
        with app.sessions() as s:
            return s.get(Job, job).cancel_requested_at is not None

    wait_for(intent, 30, interval=0.01, what="the cancel's intent")
    p.kill()  # kill -9 while it waits for the runner
    p.wait()
    for _ in range(3):
        app.ticker.tick(lock_timeout=5)
        time.sleep(0.3)
    d = service.job_detail(app, job)
    assert (d["state"], d["reason"]) == ("CANCELLED", "USER")
    assert len(d["attempts"]) == 1 and d["attempts"][0]["state"] == "CANCELLED"
    assert not attempt_processes(Path(d["attempts"][0]["backend_id"]))


def test_killed_runner_leaves_nothing_running_beside_the_retry(app, home, tmp_path):
    spec = write_spec(tmp_path, f"name: lost\ncommand: python {WORKLOAD} 6 0.3\n"
                                "retry: {max_attempts: 3, backoff: 1s, on: [FAILED, \"exit:3\"]}\n")
    [job] = service.submit(app, spec)
    run_dir = Path(service.job_detail(app, job)["attempts"][0]["backend_id"])
    wait_for(lambda: (run_dir / "runner.json").exists(), 10, what="the runner")
    os.kill(json.loads((run_dir / "runner.json").read_text())["runner_pid"], signal.SIGKILL)
    tick_until(app, [job], timeout=90)
    d = service.job_detail(app, job)
    assert "BACKEND_LOST" in d["attempts"][0]["reason"]
    assert d["state"] == "COMPLETED"
    check_exactly_once(app, home)  # no OVERLAP: attempt 2 started after attempt 1's training was stopped


def test_local_sweep_honours_max_parallel(app, home, tmp_path):
    spec = write_spec(tmp_path, f"name: par\ncommand: python {WORKLOAD} 3 0.2\nenv: {{S: \"{{s}}\"}}\n"
                                "sweep: {s: [1, 2, 3, 4, 5]}\nmax_parallel: 2\n")
    ids = service.submit(app, spec)
    most = 0

    def done() -> bool:
        nonlocal most
        app.ticker.tick(lock_timeout=5)
        running = [j for j in ids if service.job_state(app, j).value == "RUNNING"]
        most = max(most, len(running))
        return all(service.job_state(app, j).terminal for j in ids)

    wait_for(done, 90, interval=0.1, what="the sweep to end")
    assert most == 2


def readme_config() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.rindex("```yaml", 0, text.index("  host: smtp.example.org")) + len("```yaml")
    return text[start:text.index("```", start)]


def test_readme_config_example_is_accepted_with_on_as_a_key(tmp_path):
    from orchestrator.clusters import load_config

    p = tmp_path / "config.yaml"
    p.write_text(readme_config())
    cfg = load_config(p)
    assert cfg.email is not None and cfg.email.on == ["failed", "budget", "expectation"]
    assert cfg.budgets.projects["climate"].max_usd == 30


@pytest.mark.parametrize("text, where, words", [
    ("email:\n  host: x\n  projets: 1\n", ":3:", "email.projets: unknown key"),
    ("budgets:\n  projets: {}\n", ":2:", "budgets.projets: unknown key"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)), ":", "alias bomb"),
    ("a: &a\n  b: *a\n", ":1:", "an alias refers to a value that contains it"),
    ("x" * (2 << 20), "bytes", "at most"),
    ("[" * 5000 + "]" * 5000, "", "nested too deeply"),
])
def test_bad_config_is_a_clean_error_with_its_line(tmp_path, text, where, words):
    from orchestrator.clusters import load_config
    from orchestrator.errors import ConfigError

    p = tmp_path / "config.yaml"
    p.write_text(text)
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert time.time() - t0 < 5
    assert str(p) in str(e.value) and where in str(e.value) and words in str(e.value), str(e.value)


def test_cli_reports_config_and_id_errors_without_a_traceback(home, env, orchd, tmp_path):
    (home / "config.yaml").write_text("budgets:\n  projets: {}\n")
    for args in (["poll"], ["daemon", "--interval", "1"]):
        p = orchd(*args, check=False, timeout=60)
        assert p.returncode == 2 and "Traceback" not in p.stderr and "config.yaml:2: budgets.projets" in p.stderr
    (home / "config.yaml").unlink()
    p = orchd("show", "99999999999999999999999", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "no job" in p.stderr
    env["ORCHD_CONFIG"] = str(tmp_path / "missing.yaml")
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "poll"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "missing.yaml: no such config file" in p.stderr


@pytest.mark.parametrize("line, words", [
    ("env: {\"A=B\": x}", "env: 'A=B' is not an environment variable name"),
    ("env: {A: \"x\\0y\"}", "NUL"),
    ("resources: {nodes: 99999999999999999999999}", "resources.nodes: Input should be less than or equal"),
])
def test_spec_values_that_cannot_run_are_refused_at_submit(app, tmp_path, line, words):
    from orchestrator.errors import SpecError

    spec = write_spec(tmp_path, f"name: bad\ncommand: hostname\n{line}\n")
    with pytest.raises(SpecError) as e:
        service.submit(app, spec)
    assert f"{spec}:3:" in str(e.value) and words in str(e.value), str(e.value)


def test_two_homes_on_one_sqlite_file_share_one_tick_lock(tmp_path):
    from orchestrator.errors import TickBusy

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = (service.open_app({"ORCHD_HOME": str(tmp_path / h), "ORCHD_DB_URL": url}) for h in ("h1", "h2"))
    with a.ticker.lock("tick"):
        with pytest.raises(TickBusy):
            b.ticker.tick()
    b.ticker.tick()  # free again


HOLD = """
import sys, time
from sqlalchemy import create_engine
from orchestrator.dblock import db_lock
from pathlib import Path
with db_lock(create_engine(sys.argv[1]), "tick", None, Path(".")):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_killed_lock_holder_frees_the_lock(tmp_path, db, request):
    """kill -9 of the process that holds the tick lock: the next process gets it at once (the
    kernel drops the flock; PostgreSQL ends the session and its advisory lock)."""
    from sqlalchemy import create_engine

    from orchestrator.dblock import db_lock
    from orchestrator.errors import TickBusy

    url = request.getfixturevalue("pg_url") if db == "postgresql" else f"sqlite:///{tmp_path / 'x.db'}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    engine = create_engine(url)
    with pytest.raises(TickBusy):
        with db_lock(engine, "tick", 0.3, tmp_path):
            pass
    holder.kill()
    holder.wait()
    t0 = time.time()
    with db_lock(engine, "tick", 10, tmp_path):
        waited = time.time() - t0
    assert waited < 5
    engine.dispose()


def test_a_backend_raising_anything_is_no_news_not_a_crash(app, tmp_path, monkeypatch):
    """A provider SDK raising KeyError (Vast's answer without ``start_date``) inside a batched poll:
    the tick goes on (no news for those attempts), and the job ends normally once polls work."""
    [job] = service.submit(app, write_spec(tmp_path, f"name: j\ncommand: python {WORKLOAD} 2 0.05\n"
                                                     "retry: {max_attempts: 1}\n"))
    backend = app.backend("local")
    real_poll = backend.poll
    monkeypatch.setattr(backend, "poll", lambda ids, leased=(): (_ for _ in ()).throw(KeyError("start_date")))
    time.sleep(1.0)
    report = app.ticker.tick()
    assert report.jobs == 1 and service.job_state(app, job).value == "RUNNING"
    monkeypatch.setattr(backend, "poll", real_poll)
    tick_until(app, [job])
    assert service.job_detail(app, job)["reason"] == "NONZERO_EXIT"  # attempt 1 of the workload exits 3
