"""Operator insight after the fact and in between: `orchd whatif` (continue vs. restart),
`orchd report` (Markdown, HTML with a real PNG), `orchd metrics`, and the daily digest mail
through a real SMTP server (aiosmtpd), on jobs that really ran on the local backend."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import service
from orchestrator.eta import Progress
from orchestrator.whatif import compare
from tests.conftest import DATA, wait_for, write_spec

CURVE = DATA / "curves" / "burgers_depths111.log"  # a real run: val_loss every 15 steps to step 270
KEYS = "Missing keys: 2\n  - head.weight\n  - head.bias\nUnexpected keys: 0\n"


def curve_values(name: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2))) for m in
            re.finditer(rf"step (\d+)/\d+ .*?{name}=([\d.]+)", CURVE.read_text())]


def replay_spec(tmp_path: Path, name: str = "replay", extra: str = "") -> Path:
    """A job that prints a checkpoint-loading report and then a real run's log, fast."""
    (tmp_path / "run.log").write_text(KEYS + CURVE.read_text())
    return write_spec(tmp_path, f"name: {json.dumps(name)}\ncommand: cat {tmp_path}/run.log\n"
                                "expect:\n  missing_keys: [head.weight, head.bias]\n"
                                "  val_loss: {at_step: 90, approx: 0.4, tolerance: 0.1}\n"
                                "success: val_loss < 0.4 by step 270\nbaseline: {val_loss: 0.3557}\n" + extra)


def test_whatif_is_the_arithmetic_of_the_issue():
    # 45 s a step, a 20-minute validation every 25 steps, at step 43 of 311
    p = Progress(43, 311, 45.0, 1200.0, 25, None, None, 3600.0, None, None)
    w = compare(7, p, 311, 150, fix_s=40 * 60, queue_s=10 * 60, spent_s=3600, spent_usd=2.0, gpus=8,
                usd_per_hour=16.0)
    assert (w.cont.steps, w.cont.validations) == (268, 11)  # 50, 75, ..., 300
    assert w.cont.run_s == 268 * 45 + 11 * 1200 and w.cont.wait_s == 0
    assert (w.restart.steps, w.restart.validations) == (150, 6)
    assert w.restart.run_s == 150 * 45 + 6 * 1200 and w.restart.total_s == 50 * 60 + w.restart.run_s
    assert w.faster == "restart" and w.saves_s == w.cont.total_s - w.restart.total_s
    assert w.cont.gpu_hours == pytest.approx(8 * w.cont.run_s / 3600)
    assert w.saves_usd == pytest.approx(16.0 * (w.cont.run_s - w.restart.run_s) / 3600)
    slow_fix = compare(7, p, 311, 150, fix_s=10 * 3600, queue_s=0, spent_s=0, spent_usd=0, gpus=1,
                       usd_per_hour=None)
    assert slow_fix.faster == "continue" and slow_fix.saves_usd is None
    with pytest.raises(ValueError, match="no training rate"):
        compare(7, Progress(None, None, None, None, None, None, None, None, None, None), 311, 150, 0, 0, 0, 0, 0, None)


def test_report_of_a_real_job_in_markdown_html_and_csv(app, orchd, tmp_path):
    """A job named like an HTML attack ran; its report says what a person would: the keys as
    expected, val_loss at step 90 within its tolerance, the evaluations, the gain over the
    baseline; the HTML page embeds a PNG that decodes; the CSV has every sample."""
    from matplotlib.image import imread

    name = "replay <script>alert(1)</script>"
    job = int(orchd("submit", str(replay_spec(tmp_path, name)), "--wait").stdout.split()[0])
    vals = curve_values("val_loss")
    final = vals[-1][1]
    gain = (0.3557 - final) / 0.3557 * 100

    md = orchd("report", str(job)).stdout
    assert "✓ missing keys: 2 of 2 expected (head.weight, head.bias)" in md
    at90 = dict(vals)[90]
    assert f"✓ val_loss at step 90: expected 0.4 ± 0.1; got {at90:.4g} at step 90" in md
    assert "✓ success: val_loss < 0.4 by step 270" in md
    assert f"Final val_loss {final:.4g} at step 270" in md and f"{abs(gain):.2f} % " in md
    rows = [ln for ln in md.splitlines() if re.match(r"\| \d+ \| [\d.]", ln)]
    assert [int(r.split("|")[1]) for r in rows] == [s for s, _ in vals]  # every evaluation, once
    assert "<script>" not in md

    page = tmp_path / "report.html"
    orchd("report", str(job), "-o", str(page))
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    (b64,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    png = base64.b64decode(b64)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500 and pixels.std() > 0.05  # drawn, not blank

    orchd("report", str(job), "-o", str(tmp_path / "r.md"))
    assert (tmp_path / f"r-job{job}.png").read_bytes()[:4] == b"\x89PNG"
    assert f"](r-job{job}.png)" in (tmp_path / "r.md").read_text()

    since = orchd("report", "--since", "10m").stdout
    assert f"Job {job} " in since and "what changed in the last 10m" in since

    sheet = list(csv.DictReader(io.StringIO(orchd("metrics", str(job), "--csv").stdout)))
    got = [(int(r["step"]), float(r["value"])) for r in sheet if r["metric"] == "val_loss"]
    assert got == vals and {r["attempt"] for r in sheet} == {"1"}
    shown = orchd("show", str(job)).stdout
    assert f"val_loss ({len(vals)} samples)" in shown and any(c in shown for c in "▁▂▃▄▅▆▇█")


def test_whatif_on_a_running_job_and_its_errors(app, orchd, tmp_path):
    spec = write_spec(tmp_path, "name: slow\ncommand: python -m workloads.burgers --epochs 3 --step-delay 0.05 "
                                f"--ckpt-dir {tmp_path}/ckpt\nsuccess: val_loss < 0.6 by step 135\n")
    (job,) = service.submit(app, spec)

    def measured():
        app.ticker.tick(lock_timeout=5)
        p = service.job_detail(app, job)["progress"]
        return p if p and p["sec_per_step"] and p["val_seconds"] is not None and p["step"] < 120 else None

    p = wait_for(measured, 90, interval=0.5, what="a training rate and a validation measured")
    w = json.loads(orchd("whatif", str(job), "--restart", "--fix", "1m", "--queue", "30s", "--json").stdout)
    assert w["target_step"] == 135 and w["restart"]["wait_s"] == 90 and w["restart"]["steps"] == 135
    assert w["continue"]["steps"] == 135 - w["step"] and w["queue_from"] == "given"
    assert w["restart"]["run_s"] > w["continue"]["run_s"] and w["faster"] == "continue"
    assert abs(w["continue"]["run_s"] / (w["continue"]["steps"] * p["sec_per_step"] +
                                         w["continue"]["validations"] * p["val_seconds"]) - 1) < 0.5
    auto = json.loads(orchd("whatif", str(job), "--json").stdout)  # the queue wait of this backend's attempts
    assert auto["queue_from"] == "median of 1 recent attempt(s) on local" and auto["restart"]["wait_s"] < 5
    text = orchd("whatif", str(job), "--steps", "20").stdout
    assert "restart" in text and "continue" in text and "sooner by" in text
    service.cancel(app, job)
    bad = orchd("whatif", str(job), check=False)
    assert bad.returncode == 2 and "only a running job" in bad.stderr and "Traceback" not in bad.stderr
    assert "not a duration" in orchd("whatif", str(job), "--fix", "soon", check=False).stderr


def test_daily_digest_mails_the_report_with_plots_once(home, smtp, tmp_path):
    def configure(on: list[str]) -> service.App:
        (home / "config.yaml").write_text(yaml.safe_dump({"email": {
            "host": "127.0.0.1", "port": smtp.port, "security": "none", "from": "orchd@lab", "to": ["team@lab"],
            "on": on, "digest_time": "00:00"}}))
        return service.open_app({"ORCHD_HOME": str(home), "ORCHD_TICK_SECONDS": "1"})

    app = configure(["failed"])  # the job runs while the digest is not asked for...
    (job,) = service.submit(app, replay_spec(tmp_path))

    def done():
        app.ticker.tick(lock_timeout=5)
        return service.job_detail(app, job)["ended_at"]

    wait_for(done, 60, what="the job to end")
    assert app.flush_alerts() == 0
    app = configure(["failed", "digest"])  # ... then it is: the first tick after 00:00 mails it
    app.ticker.tick(lock_timeout=5)
    assert app.flush_alerts() == 1
    (mail,) = smtp.inbox.messages
    assert mail["to"] == ["team@lab"] and mail["subject"] == "[orchd] digest: 1 job(s) changed"
    assert f"## Job {job} replay" in mail["body"] and "✓ missing keys: 2 of 2" in mail["body"]
    ((fname, ctype, png),) = mail["attachments"]
    assert (fname, ctype) == (f"job{job}.png", "image/png") and png[:8] == b"\x89PNG\r\n\x1a\n"
    for _ in range(2):  # the next ticks, and a second process, add nothing today
        app.ticker.tick(lock_timeout=5)
        service.open_app({"ORCHD_HOME": str(home)}).ticker.tick(lock_timeout=5)
    assert app.flush_alerts() == 0 and len(smtp.inbox.messages) == 1


def test_report_needs_a_job_and_survives_an_unreadable_spec(app, orchd, tmp_path):
    from sqlalchemy import update

    from orchestrator.models import Job

    assert "name a job" in orchd("report", check=False).stderr
    assert "no job 99" in orchd("report", "99", check=False).stderr
    (job,) = service.submit(app, write_spec(tmp_path, "name: q\ncommand: echo val_loss=0.5\n"), start_now=False)
    assert ".html or a .md" in orchd("report", str(job), "-o", str(tmp_path / "r.pdf"), check=False).stderr
    with app.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job).values(spec_json='{"name": 1}'))
    md = orchd("report", str(job)).stdout
    assert f"## Job {job} q" in md and time.strftime("%Y-%m-%d") in md
