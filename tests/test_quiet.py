"""The tick's fast path (orchestrator/quiet.py) against its ORM pass: the same rows from the same
logs, and a kill -9 in the middle of its writes loses and duplicates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator import service
from orchestrator.costs import attempt_usage
from orchestrator.models import Action, Attempt, Job, KeysReport, MetricSample
from tests.conftest import ROOT, write_spec

SPECS = {  # name -> what the spec adds to `command: sleep 120`
    "plain": "metrics: [val_loss, train_loss]\n",
    "success": 'success: "val_loss < 0.3"\n',
    "cancel": 'cancel_if: ["val_loss > 5"]\n',
    "keys": "expect: {missing_keys: {at_most: 5}}\n",
    "silent": "",
}


def lines(name: str, tick: int) -> str:
    """What job ``name`` logs before tick ``tick`` (1-based)."""
    if name == "silent":
        return ""
    out = "".join(f"\rEpoch {tick}: {i}/4 [00:01<00:02, loss={1 / (tick * 10 + i):.4f}]" for i in range(4)) + "\n"
    out += f"step {tick * 100} epoch {tick} train_loss={0.9 / tick:.4f} val_loss={0.6 / tick:.4f}\n"
    out += "[rank0] iteration done in 1.23 s, no metric on this line\n"
    if name == "cancel" and tick == 3:
        out += f"step {tick * 100 + 1} val_loss=9.5\n"
    if name == "keys" and tick == 2:
        out += "_IncompatibleKeys(missing_keys=['head.weight', 'head.bias'], unexpected_keys=[])\n"
    return out


def run_scenario(tmp_path: Path, env: dict[str, str], fast: bool) -> tuple[dict, int]:
    """Submit SPECS, tick 5 times at fixed clocks 10 s apart with the logs growing between ticks;
    return (what the database holds per job name, attempts taken on the fast path)."""
    app = service.open_app(env)
    if not fast:
        app.ticker.fast_path = None
    ids = {}
    for name, extra in SPECS.items():
        [ids[name]] = service.submit(app, write_spec(tmp_path, f"name: {name}\ncommand: sleep 120\n{extra}",
                                                     f"{name}.yaml"))
    logs = {n: Path(service.job_detail(app, j)["attempts"][0]["backend_id"]) / "output.log" for n, j in ids.items()}
    t0, quiet = time.time(), 0
    for tick in range(1, 6):
        for name, path in logs.items():
            with open(path, "a") as f:
                f.write(lines(name, tick))
        quiet += app.ticker.tick(now=t0 + 10 * tick).quiet
    held = {}
    with app.sessions() as s:
        for name, j in ids.items():
            job = s.get(Job, j)
            att = s.scalars(select(Attempt).where(Attempt.job_id == j)).one()
            assert (att.cost_usd, att.gpu_hours) == pytest.approx(attempt_usage(att, t0 + 50)), name
            assert job.cost_usd == pytest.approx(att.cost_usd), name
            held[name] = {
                "job": (job.state, job.reason, job.detail),
                "attempt": (att.state, att.log_offset, json.loads(att.parser_state), json.loads(att.rule_state),
                            round(att.last_log_at - t0, 6) if att.last_log_at > t0 else "at its start"),
                "samples": [(m.name, m.step, m.epoch, m.value, m.offset, round(m.at - t0, 6))
                            for m in s.scalars(select(MetricSample).where(MetricSample.job_id == j)
                                               .order_by(MetricSample.id))],
                "keys": [(k.kind, k.count, k.keys_json, k.offset)
                         for k in s.scalars(select(KeysReport).where(KeysReport.job_id == j))],
                "actions": [a.kind for a in s.scalars(select(Action).where(Action.job_id == j).order_by(Action.id))],
            }
    for j in ids.values():
        service.cancel(app, j)
    return held, quiet


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_fast_path_writes_what_the_orm_pass_writes(tmp_path, db, request):
    """Five jobs, five ticks: plain metrics with tqdm refreshes, a success criterion met on tick 2,
    a cancel_if on tick 3, a checkpoint report on tick 2, a silent log; at $3.60/hr. The fast path
    takes most attempt-ticks, and the database ends the same, row for row, as with every job
    through the ORM pass (offsets, parser and rule state, samples, reports, actions, costs)."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("local: {usd_per_hour: 3.6}\n")
    held = {}
    for fast in (True, False):
        home = tmp_path / f"home-{fast}"
        home.mkdir()
        env = {**os.environ, "ORCHD_HOME": str(home), "ORCHD_CONFIG": str(cfg)}
        if db == "postgresql":
            env["ORCHD_DB_URL"] = request.getfixturevalue("pg_database")()
        (tmp_path / f"specs-{fast}").mkdir()
        held[fast], quiet = run_scenario(tmp_path / f"specs-{fast}", env, fast)
        if fast:
            assert 15 <= quiet < 25, quiet  # 25 attempt-ticks; the news (start prices, decisions, report) not here
        else:
            assert quiet == 0
    assert held[True] == held[False]
    assert held[True]["cancel"]["job"][:2] == ("FAILED", "EARLY_STOP")
    assert "success" in held[True]["success"]["actions"]
    assert held[True]["keys"]["keys"][0][:2] == ("missing", 2)
    assert [m[5] for m in held[True]["plain"]["samples"] if m[0] == "val_loss"] == [10.0, 20.0, 30.0, 40.0, 50.0]
    # (each tick's val_loss recorded once, at that tick's clock)


KILLED_TICK = """
import os, signal, sys
import orchestrator.db, orchestrator.logread, orchestrator.quiet as quiet
from orchestrator import service

where = sys.argv[1]
def then_die(real):
    def f(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # written, not committed
    return f
if where == "after the offsets":
    quiet.update_many = then_die(quiet.update_many)
else:
    quiet.logread.insert_samples = then_die(quiet.logread.insert_samples)
service.open_app(os.environ).ticker.tick()
"""


@pytest.mark.parametrize("where", ["after the offsets", "after the samples"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_kill9_in_the_fast_path_loses_and_duplicates_nothing(tmp_path, home, db, where, request):
    """A tick SIGKILLed after the fast path wrote its attempts' offsets, or its samples, but
    before its commit: the next tick (another process) records every logged value once."""
    env = {**os.environ, "ORCHD_HOME": str(home)}
    if db == "postgresql":
        env["ORCHD_DB_URL"] = request.getfixturevalue("pg_url")
    app = service.open_app(env)
    ids = [service.submit(app, write_spec(tmp_path, f"name: j{i}\ncommand: sleep 120\n", f"j{i}.yaml"))[0]
           for i in range(3)]
    logs = [Path(service.job_detail(app, j)["attempts"][0]["backend_id"]) / "output.log" for j in ids]
    app.ticker.tick()  # the start's own news (through the ORM pass)
    for i, path in enumerate(logs):
        path.write_text("".join(f"step {k} val_loss={1 / k:.5f}\n" for k in range(1, 101 + i)))
    killed = subprocess.run([sys.executable, "-c", KILLED_TICK, where], env=env, cwd=ROOT, timeout=120)
    assert killed.returncode == -9
    r = service.open_app(env).ticker.tick()
    assert r.quiet == 3
    with app.sessions() as s:
        for i, (j, path) in enumerate(zip(ids, logs, strict=True)):
            steps = s.scalars(select(MetricSample.step).where(MetricSample.job_id == j)
                              .order_by(MetricSample.id)).all()
            assert steps == list(range(1, 101 + i))
            assert s.scalars(select(Attempt.log_offset).where(Attempt.job_id == j)).one() == path.stat().st_size
    for j in ids:
        service.cancel(app, j)
