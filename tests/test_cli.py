"""Everyday use through the CLI, as a subprocess: terminal widths, `status --watch`, `logs -f`
across retries, failures explained, exit codes and conventions, the config commands, hints,
cron and systemd, and alert mails that carry the figures of the moment they were sent."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import service
from tests.conftest import ROOT, wait_for, write_spec

FAILING = textwrap.dedent("""\
    import sys
    print("step 1 train_loss=1.0", flush=True)
    how = sys.argv[1]
    if how == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)")
    if how == "nccl":
        raise RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1275, unhandled system error, NCCL version 2.14.3")
    if how in ("killed", "oomkill"):
        import os, signal
        if how == "oomkill":
            print("slurmstepd: error: Detected 1 oom_kill event in StepId=42.0. Some of the step tasks have been "
                  "OOM Killed.", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # /bin/sh then says "Killed"
    raise ValueError("shapes (3,4) and (5,6) not aligned")
""")


def cli(env: dict, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def until_ended(app: service.App, ids: list[int], timeout: float = 60) -> list[dict]:
    def check():
        app.ticker.tick(lock_timeout=5)
        ds = [service.job_detail(app, i) for i in ids]
        return ds if all(d["ended_at"] for d in ds) else None

    return wait_for(check, timeout, interval=0.3, what=f"jobs {ids} to end")


def test_failures_are_explained_from_the_end_of_the_log(app, orchd, smtp, home, tmp_path, monkeypatch):
    (home / "config.yaml").write_text(yaml.safe_dump({"email": {
        "host": "127.0.0.1", "port": smtp.port, "security": "none", "to": ["me@lab"], "on": ["failed"]}}))
    app = service.open_app({**os.environ, "ORCHD_HOME": str(home)})
    (tmp_path / "fail.py").write_text(FAILING)
    spec = write_spec(tmp_path, f"name: f\ncommand: python {tmp_path}/fail.py {{how}}\n"
                                "sweep: {how: [oom, nccl, killed, oomkill, plain]}\n")
    oom, nccl, killed, oomkill, plain = until_ended(app, service.submit(app, spec))
    assert oom["state"] == "OUT_OF_MEMORY" and "GPU out of memory: RuntimeError: CUDA out of memory" in oom["detail"]
    assert oom["attempts"][0]["error_lines"][-1].startswith("RuntimeError: CUDA out of memory. Tried to allocate")
    assert any(ln.lstrip().startswith('File "') and "fail.py" in ln for ln in oom["attempts"][0]["error_lines"])
    assert nccl["state"] == "FAILED" and "NCCL/RCCL collective failed: RuntimeError: NCCL error" in nccl["detail"]
    assert killed["state"] == "FAILED" and "killed by SIGKILL (exit 137; often the out-of-memory" in killed["detail"]
    assert oomkill["state"] == "OUT_OF_MEMORY" and "killed by the out-of-memory killer" in oomkill["detail"]
    assert plain["state"] == "FAILED"
    assert plain["detail"] == "FAILED exit 1 (ValueError: shapes (3,4) and (5,6) not aligned)"
    shown = orchd("show", str(oom["id"])).stdout
    assert "attempt 1 error" in shown and "RuntimeError: CUDA out of memory" in shown
    app.flush_alerts()
    (mail,) = smtp.inbox.messages  # 5 alerts at once: one mail
    assert mail["body"].count("The end of its log:") == 5 and "  ValueError: shapes (3,4)" in mail["body"]


def test_alert_mail_carries_the_figures_when_sent_not_stale_ones(home, smtp, tmp_path):
    (home / "config.yaml").write_text(yaml.safe_dump({"local": {"usd_per_hour": 36.0}, "email": {
        "host": "127.0.0.1", "port": smtp.port, "security": "none", "to": ["me@lab"], "on": ["failed"]}}))
    app = service.open_app({**os.environ, "ORCHD_HOME": str(home)})
    spec = write_spec(tmp_path, "name: diverges\ncommand: echo 'step 50 val_loss=1.0'; sleep 2; "
                                "echo 'step 150 val_loss=5.0'; sleep 60\ncancel_if: ['val_loss > 3']\n")
    (d,) = until_ended(app, service.submit(app, spec))
    assert d["state"] == "FAILED" and d["reason"] == "EARLY_STOP"
    assert app.flush_alerts() == 1
    (mail,) = smtp.inbox.messages
    assert "val_loss=5 (step 150)" in mail["body"] and f"Cost so far: ${d['cost_usd']:.2f}" in mail["body"]


def test_logs_follow_the_job_across_its_attempts(app, env, tmp_path):
    spec = write_spec(tmp_path, "name: flaky\ncommand: echo \"hello from attempt $ORCHD_ATTEMPT\"; sleep 1; "
                                "test $ORCHD_ATTEMPT = 2\nretry: {max_attempts: 2, backoff: 1s, on: [FAILED]}\n")
    (job,) = service.submit(app, spec)
    follower = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "logs", str(job), "-f"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    until_ended(app, [job])
    got, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0
    first, marker, second = got.index("hello from attempt 1"), got.index("==> orchd: attempt 1 ended (FAILED"), \
        got.index("hello from attempt 2")
    assert first < marker < second and f"job {job} attempt 2" in got


def ctrl_c_works() -> None:
    """In the child, before exec: SIGINT as a terminal gives it. A test suite started in the
    background by a shell without job control inherits SIGINT ignored (POSIX), and Python then
    installs no KeyboardInterrupt handler: the Ctrl-C these tests send would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def first_line(stream, timeout: float) -> str:
    """The next line a child process writes to ``stream`` ("" if none comes within ``timeout`` s)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


def test_status_fits_80_columns_and_watch_refreshes(app, env, tmp_path):
    spec = write_spec(tmp_path, "name: a_rather_long_sweep_name_for_a_small_terminal\ncommand: echo step 3/9 lr={lr} "
                                "val_loss=0.5; sleep 30\nsweep: {lr: [1e-3, 3e-4]}\n")
    ids = service.submit(app, spec)
    wait_for(lambda: app.ticker.tick(lock_timeout=5) and all(
        service.job_detail(app, i)["state"] == "RUNNING" for i in ids), 20, what="running")
    env80 = {**env, "COLUMNS": "80"}
    p = cli(env80, "status")
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and all(len(ln) <= 80 for ln in lines), lines
    head = lines[0].split()
    assert {"STATE", "STEP", "REASON", "VAL_LOSS", "COST"} <= set(head)
    rows = [ln.split() for ln in lines[1:3]]
    assert all(r[head.index("STATE")] == "RUNNING" and r[head.index("STEP")] == "3/9" and r[-1] == "STARTED"
               and not any("…" in c for c in r[2:]) for r in rows), lines  # only the name may be shortened
    assert "no daemon or cron tick yet" in p.stdout  # nothing but this test ticks
    assert cli(env, "health").returncode == 1
    cli(env, "poll")
    assert "no daemon or cron tick" not in cli(env80, "status").stdout
    assert cli(env, "health").returncode == 0 and cli(env, "health", "--max-age", "0.001").returncode == 1
    down = cli({**env, "ORCHD_DB_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x"}, "status")
    assert down.returncode == 3 and "the job database: OperationalError" in down.stderr
    assert "Traceback" not in down.stderr
    watcher = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "status", "--watch", "--interval", "0.5"],
                               env=env80, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_works)
    hint = first_line(watcher.stderr, 60)  # up and watching (a Ctrl-C while Python starts is not what is tested)
    assert "not a terminal" in hint, hint
    time.sleep(1.5)
    watcher.send_signal(signal.SIGINT)
    got, errs = watcher.communicate(timeout=20)
    assert watcher.returncode == 0 and "Traceback" not in errs and "RUNNING" in got
    for i in ids:
        service.cancel(app, i)


def test_conventions_version_exit_codes_hints(env, tmp_path):
    from orchestrator import __version__

    assert cli(env, "--version").stdout.strip() == f"orchd {__version__}"
    helped = cli({**env, "COLUMNS": "100"}, "submit", "--help").stdout.splitlines()
    assert any("--wait" in ln for ln in helped) and not any("--wait" in ln and "<bool>" in ln for ln in helped)
    assert any("SPEC" in ln for ln in helped)
    bad = write_spec(tmp_path, "name: x\ncommand: 'true'\nresources: {time_limt: 5m}\n", "bad.yaml")
    p = cli(env, "submit", str(bad))
    assert p.returncode == 2 and "time_limt" in p.stderr  # your input is wrong: 2
    assert cli(env, "show", "42").returncode == 2
    failing = write_spec(tmp_path, "name: fails\ncommand: exit 3\n", "fails.yaml")
    p = cli(env, "submit", str(failing), "--wait")
    assert p.returncode == 1  # the job failed: 1
    p = cli(env, "submit", str(write_spec(tmp_path, "name: ok\ncommand: 'true'\n", "ok.yaml")))
    job = p.stdout.strip()
    assert p.returncode == 0 and f"orchd logs {job} -f" in p.stderr and "nothing ticks yet" in p.stderr
    assert cli(env, "-q", "status").returncode == 0
    slow = write_spec(tmp_path, "name: slow\ncommand: sleep 30\n", "slow.yaml")
    waiter = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "submit", str(slow), "--wait"], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=ctrl_c_works)
    job = first_line(waiter.stdout, 60)  # submitted, now following it
    assert job.strip().isdigit(), job
    time.sleep(1)
    waiter.send_signal(signal.SIGINT)
    got, errs = waiter.communicate(timeout=20)
    assert waiter.returncode == 130 and "stopped following" in errs and "Traceback" not in errs
    cli(env, "cancel", job.strip())


def test_config_commands_and_the_xdg_place(env, home, tmp_path):
    xdg = Path(env["XDG_CONFIG_HOME"]) if "XDG_CONFIG_HOME" in env else tmp_path / "xdg-config"
    env = {**env, "XDG_CONFIG_HOME": str(xdg)}
    assert cli(env, "config", "path").stdout.strip() == str(home / "config.yaml")
    (xdg / "orchd").mkdir(parents=True)
    (xdg / "orchd" / "config.yaml").write_text("clusters:\n  lab: {mode: local}\nemail:\n  host: x\n"
                                               "  password_env: ORCHD_TEST_NOT_SET\n")
    assert cli(env, "config", "path").stdout.strip() == str(xdg / "orchd" / "config.yaml")  # home has none
    p = cli(env, "config", "check")
    assert p.returncode == 1 and "1 cluster profile(s) (lab)" in p.stdout
    assert "$ORCHD_TEST_NOT_SET is not set" in p.stderr
    shown = yaml.safe_load(cli(env, "config", "show").stdout)
    assert shown["clusters"]["lab"]["mode"] == "local" and shown["email"]["port"] == 587  # defaults filled in
    (home / "config.yaml").write_text("budgets:\n  projets: {}\n")  # ORCHD_HOME's wins, and it has a typo
    p = cli(env, "config", "check")
    assert p.returncode == 2 and "config.yaml:2: budgets.projets: unknown key" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli({**env, "ORCHD_CONFIG": str(tmp_path / "nope.yaml")}, "config", "check")
    assert p.returncode == 2 and "no such config file" in p.stderr


def test_install_cron_writes_a_working_line_and_removes_it(env, home, tmp_path):
    if shutil.which("crontab") is None:
        if os.environ.get("ORCHD_REQUIRE_CRON") == "1":
            pytest.fail("no crontab: run scripts/install-test-tools.sh")
        pytest.skip("no crontab (scripts/install-test-tools.sh installs it)")
    before = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    mine = "# someone else's line\n17 3 * * * /bin/true\n"
    subprocess.run(["crontab", "-"], input=mine, text=True, check=True)
    try:
        secret_env = {**env, "VAST_API_KEY": "vk-secret-123"}
        p = cli(secret_env, "install-cron")
        assert p.returncode == 0, p.stderr
        table = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=True).stdout
        (line,) = [ln for ln in table.splitlines() if "orchd install-cron" in ln]
        assert "17 3 * * * /bin/true" in table and "vk-secret" not in table and f"ORCHD_HOME={home}" in line
        assert cli(env, "install-cron").returncode == 0  # again: replaced, not added twice
        assert subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout.count("install-cron") == 1
        command = line.split(" ", 5)[5]  # what cron would run, run by the shell as cron does
        subprocess.run(["/bin/sh", "-c", command], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       check=True, timeout=60)
        assert "tick:" in (home / "poll.log").read_text()
        app = service.open_app({"ORCHD_HOME": str(home)})
        assert service.beat_age(app) < 60  # the tick was a poll: status stops warning
        assert "removed" in cli(env, "install-cron", "--uninstall").stdout
        fake = tmp_path / "bin"  # a crontab that cannot read the table must not get it replaced
        fake.mkdir()
        (fake / "crontab").write_text("#!/bin/sh\n[ \"$1\" = -l ] && { echo 'crontab: cannot open' >&2; exit 1; }\n"
                                      "cat > /dev/null; echo REPLACED > " + str(tmp_path / "replaced") + "\n")
        (fake / "crontab").chmod(0o755)
        p = cli({**env, "PATH": f"{fake}:{env['PATH']}"}, "install-cron")
        assert p.returncode == 2 and "was not changed" in p.stderr and not (tmp_path / "replaced").exists()
        after = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
        assert "install-cron" not in after and "17 3 * * * /bin/true" in after
    finally:
        subprocess.run(["crontab", "-"], input=before.stdout if before.returncode == 0 else "", text=True)


def test_install_service_writes_a_valid_user_unit_without_secrets(env, home, tmp_path):
    xdg = tmp_path / "xdg"
    env = {**env, "XDG_CONFIG_HOME": str(xdg), "RUNPOD_API_KEY": "rp-secret-456"}
    p = cli(env, "install-service")
    assert p.returncode == 0 and "wrote" in p.stdout
    unit = xdg / "systemd" / "user" / "orchd.service"
    text = unit.read_text()
    assert "rp-secret" not in text and f'Environment="ORCHD_HOME={home}"' in text and " daemon" in text
    assert f"EnvironmentFile=-{xdg}/orchd/orchd.env" in text
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert v.returncode == 0, v.stderr
    assert "removed" in cli(env, "install-service", "--uninstall").stdout and not unit.exists()


def test_alerts_reach_a_webhook_through_apprise_once_and_keep_its_token_home(home, smtp, tmp_path, monkeypatch,
                                                                            caplog):
    """A json:// webhook (apprise) beside the mail: a refused POST is retried with backoff, a
    delivered one is never sent again; the URL's token (from the environment) reaches the
    receiver's header but not the database, the job's environment or its log."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sqlalchemy import select

    from orchestrator.models import Alert
    from orchestrator.notify import flush_outbox

    received, answer = [], {"code": 500}
    caplog.set_level(logging.DEBUG)  # as `orchd -vv daemon` logs

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's hook name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body), self.headers.get("X-Token")))
            self.send_response(answer["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HOOK_TOKEN", "tok-789")
    url = f"json://127.0.0.1:{server.server_port}/hook?+X-Token=${{HOOK_TOKEN}}"
    (home / "config.yaml").write_text(yaml.safe_dump({
        "email": {"host": "127.0.0.1", "port": smtp.port, "security": "none", "to": ["me@lab"], "on": ["failed"]},
        "notify": {"urls": [url], "on": ["failed"]}}))
    app = service.open_app({**os.environ, "ORCHD_HOME": str(home)})
    spec = write_spec(tmp_path, "name: hooked\ncommand: echo \"token=[$HOOK_TOKEN]\"; exit 3\n")
    try:
        (d,) = until_ended(app, service.submit(app, spec))
        assert app.flush_alerts() == 1  # the mail; the webhook answered 500
        assert len(received) == 1 and len(smtp.inbox.messages) == 1
        answer["code"] = 200
        assert app.flush_alerts() == 0  # backoff: not yet
        later = time.time() + 60
        sent = flush_outbox(app.sessions, app.config.email, now=later, channels=app.config.notify)
        assert sent == 1 and len(received) == 2
        assert flush_outbox(app.sessions, app.config.email, now=later + 3600, channels=app.config.notify) == 0
        assert len(received) == 2  # delivered once
        path, payload, token = received[-1]
        assert path == "/hook" and token == "tok-789" and f"job {d['id']} hooked" in payload["title"]
        assert "FAILED" in payload["message"]
    finally:
        server.shutdown()
    with app.sessions() as s:
        stored = " ".join(f"{a.key} {a.recipients} {a.last_error} {a.body}" for a in s.scalars(select(Alert)))
    assert "tok-789" not in stored and "HOOK_TOKEN" not in stored and "url:" in stored
    assert "tok-789" not in caplog.text and "apprise" in caplog.text.lower()
    backend, att, _ = service.log_source(app, d["id"])
    assert b"token=[]" in backend.read_log(att.backend_id, 0, 4096)  # the job never saw it


def test_a_cloud_spec_without_the_cloud_extra_is_a_clean_error(env, tmp_path):
    spec = write_spec(tmp_path, "name: c\nbackend: vastai\ncommand: 'true'\nresources: {gpu: [RTX 4090]}\n")
    (tmp_path / "config.yaml").write_text("vastai: {api_key_env: VAST_API_KEY}\n")
    code = ("import sys; sys.modules['httpx'] = None; sys.argv = ['orchd', 'submit', sys.argv[1]]; "
            "from orchestrator.cli import run; run()")
    env = {**env, "ORCHD_CONFIG": str(tmp_path / "config.yaml")}
    p = subprocess.run([sys.executable, "-c", code, str(spec)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "pip install 'orchd[cloud]' (httpx is missing)" in p.stderr
    assert "Traceback" not in p.stderr


def test_status_and_costs_show_the_newest_jobs_and_say_how_many_more(app, env, tmp_path):
    ids = service.submit(app, write_spec(tmp_path, "name: s\ncommand: echo {n}\nsweep: {n: [1, 2, 3]}\n"))
    until_ended(app, ids)
    p = cli(env, "status", "--limit", "2")
    shown = [ln.split()[0] for ln in p.stdout.splitlines()[1:] if ln.split() and ln.split()[0].isdigit()]
    assert shown == [str(i) for i in ids[1:]] and "... and 1 older job(s)" in p.stdout
    json_rows = json.loads(cli(env, "status", "--json", "--limit", "0").stdout)
    assert [r["id"] for r in json_rows] == ids
    c = cli(env, "costs", "--limit", "2").stdout
    assert "... 1 older job(s)" in c and f"{ids[0]} s" not in c and f"{ids[2]} s" in c
    assert c.splitlines()[-1].split()[0] == "TOTAL" and c.splitlines()[-1].split()[-1] == "3"
