"""How quick is the CLI? Wall time of `orchd` commands (the installed entry point, a fresh
process each, median of --repeat runs) on a database with a few jobs and on one with N jobs.

    python bench/bench_cli.py [--jobs 10000] [--repeat 3]

Goals (issue #15): `orchd --help` and `orchd status` with few jobs <= 0.25 s; `status --all`,
`status --all --json` and `costs` with 10,000 jobs <= 0.5 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sqlalchemy import insert  # noqa: E402

from bench.machine import machine_speed  # noqa: E402
from orchestrator import service  # noqa: E402
from orchestrator.models import Attempt, Job, MetricSample  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402

ORCHD = [str(Path(sys.executable).parent / "orchd")]


def fill(home: Path, n: int, running: int = 100) -> None:
    """``n`` jobs: all but ``running`` COMPLETED an hour ago with one priced attempt and three
    samples; the newest ``running`` RUNNING."""
    app = service.open_app({"ORCHD_HOME": str(home)})
    running_n = running
    spec = JobSpec(name="bench", command="python train.py").model_dump_json()
    now = time.time()
    jobs, atts, samples = [], [], []
    for i in range(1, n + 1):
        running = i > n - running_n
        jobs.append({"id": i, "name": f"sweep[lr={i}]", "backend": "local", "project": f"p{i % 7}",
                     "state": "RUNNING" if running else "COMPLETED", "reason": "STARTED" if running else "SUCCESS",
                     "detail": "", "spec_json": spec, "spec_path": "/x.yaml", "created_at": now - 7200,
                     "started_at": now - 7000, "ended_at": None if running else now - 3600, "cost_usd": 1.5})
        atts.append({"job_id": i, "number": 1, "state": "RUNNING" if running else "COMPLETED", "backend_id": f"/j/{i}",
                     "submitted_at": now - 7200, "started_at": now - 7000, "ended_at": None if running else now - 3600,
                     "usd_per_hour": 2.0, "gpus": 1, "gpu_hours": 0.9, "cost_usd": 1.5, "log_offset": 0})
        samples += [{"job_id": i, "attempt": 1, "name": name, "step": step, "value": v, "at": now - 4000, "offset": 0}
                    for name, step, v in (("train_loss", 100, 0.5), ("val_loss", 100, 0.4), ("val_loss", 200, 0.35))]
    with app.sessions.begin() as s:
        s.execute(insert(Job), jobs)
        s.execute(insert(Attempt), atts)
        s.execute(insert(MetricSample), samples)


def timed(home: Path, args: list[str], repeat: int) -> tuple[float, int]:
    env = {**os.environ, "ORCHD_HOME": str(home), "COLUMNS": "120"}
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(ORCHD + args, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise SystemExit(f"orchd {' '.join(args)}: exit {p.returncode}: {p.stderr[-500:]}")
        size = len(p.stdout)
    return statistics.median(times), size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        few, many = Path(tmp) / "few", Path(tmp) / "many"
        few.mkdir(), many.mkdir()
        fill(few, 5, running=2)
        t0 = time.perf_counter()
        fill(many, args.jobs)
        print(f"{args.jobs} jobs written in {time.perf_counter() - t0:.1f}s")
        rows = [("orchd --help", few, ["--help"], 0.25), ("orchd status (5 jobs, 2 running)", few, ["status"], 0.25),
                (f"orchd status --all ({args.jobs} jobs, newest 50)", many, ["status", "--all"], 0.5),
                (f"orchd status --all --limit 0 ({args.jobs}, whole table)", many, ["status", "--all", "--limit", "0"],
                 None),
                (f"orchd status --all --json --limit 0 ({args.jobs})", many, ["status", "--all", "--json",
                                                                               "--limit", "0"], 0.5),
                (f"orchd costs ({args.jobs})", many, ["costs"], 0.5),
                (f"orchd costs --by project ({args.jobs})", many, ["costs", "--by", "project"], 0.5)]
        print(f"{'command':<52} {'median':>8} {'goal':>7}")
        for label, home, argv, goal in rows:
            t, size = timed(home, argv, args.repeat)
            verdict = "" if goal is None else "OK" if t <= goal else "MISSED"
            print(f"{label:<52} {t:>7.2f}s {'-' if goal is None else f'{goal:.2f}s':>7} {verdict:6} "
                  f"({size / 1024:.0f} KiB out)")
        print(f"machine: sum(range(10**6)) {machine_speed():.1f} ms (a yardstick: see bench/machine.py)")
        if args.jobs:
            got = json.loads(subprocess.run(ORCHD + ["status", "--all", "--json", "--limit", "0"], capture_output=True,
                                            text=True, env={**os.environ, "ORCHD_HOME": str(many)}).stdout)
            assert len(got) == args.jobs, len(got)


if __name__ == "__main__":
    main()
