"""Ticks over N active local jobs whose logs grew, as ``orchd poll`` and the daemon run them.

    python bench/bench_tick.py [--jobs 1000] [--growth-mb 1] [--ticks 3] [--dense] [--poll]

Goals (issue #15), each printed beside its figure at the end:
    --jobs 10000 --growth-mb 10              one tick <= 1 s
    --jobs 1 --growth-mb 20 --dense          >= 200,000 samples recorded per second, a tick <= ~1 s
                                             (at most MAX_SAMPLES_PER_TICK per attempt; the rest next tick)
    --jobs 1000 --growth-mb 1 --ticks 10000  RSS <= 150 MB, flat

Sets up N RUNNING jobs, each with a spec of its own, in a fresh SQLite database, each with a
live "runner" (one shared ``sleep`` process stands in for the runners, so polling sees them
alive), appends growth/N bytes of realistic training log to every job's log, and times whole
ticks (poll, read from the stored offset, parse, record, rules, commit) as the daemon runs
them; ``--poll`` then times ``orchd poll`` on the same jobs, a fresh process as from cron.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine_speed  # noqa: E402
from orchestrator import service  # noqa: E402
from orchestrator.backends.local_runner import proc_start_time  # noqa: E402
from orchestrator.models import Attempt, Job, MetricSample  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402
from orchestrator.states import JobState  # noqa: E402


def rss_mb() -> float:
    """This process's resident set now (MB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def log_lines(job: int, start_step: int, nbytes: int, dense: bool = False) -> bytes:
    out, step = [], start_step
    size = 0
    while size < nbytes:
        step += 1
        line = (f"step {step}/100000 epoch {step // 500} train_loss={1 / step:.5f} val_loss={0.5 + 1.1 / step:.5f} "
                f"nrmse=0.5\n" if dense or step % 10 == 0 else
                f"[rank0] iteration {step} throughput 1234.5 samples/s lr 3.0e-04 mem 10.2GB\n").encode()
        out.append(line)
        size += len(line)
    return b"".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--growth-mb", type=float, default=1.0)
    ap.add_argument("--ticks", type=int, default=3)
    ap.add_argument("--dense", action="store_true", help="every line logs three metrics (samples/s)")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the ticks after the first into FILE "
                    "(python -m pstats FILE)")
    ap.add_argument("--poll", action="store_true", help="after the ticks, time `orchd poll` on the same jobs "
                    "(a fresh process, as from cron)")
    ap.add_argument("--profile-first", action="store_true", help="with --profile: from the first tick on "
                    "(this process's, every spec parsed and every parser built)")
    args = ap.parse_args()
    profiler = cProfile.Profile()
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            app = service.open_app({"ORCHD_HOME": tmp})
            spec = JobSpec.model_validate({"name": "bench", "command": "true", "workdir": tmp,
                                           "metrics": ["val_loss", "train_loss", "nrmse"],
                                           "cancel_if": ["val_loss is nan", "no_progress 1h"],
                                           "success": "val_loss < 1e-9"})
            runner = {"runner_pid": sleeper.pid, "runner_start": proc_start_time(sleeper.pid), "pgid": sleeper.pid,
                      "started_at": time.time()}
            now = time.time()
            logs = []
            with app.sessions.begin() as s:
                for i in range(args.jobs):
                    run_dir = Path(tmp) / "jobs" / str(i + 1) / "a1"
                    run_dir.mkdir(parents=True)
                    (run_dir / "runner.json").write_text(json.dumps(runner))
                    (run_dir / "output.log").write_bytes(b"")
                    logs.append(run_dir / "output.log")
                    # a spec of its own, as a sweep's jobs have (the parsed-spec cache must hold them all)
                    own = spec.model_copy(update={"name": f"bench-{i}", "env": {"LR": f"{1e-4 * (i + 1):g}"}})
                    job = Job(name=f"bench-{i}", backend="local", state=JobState.RUNNING.value, reason="STARTED",
                              detail="", spec_json=own.model_dump_json(), created_at=now, started_at=now)
                    s.add(job)
                    s.flush()
                    s.add(Attempt(job_id=job.id, number=1, state="RUNNING", backend_id=str(run_dir),
                                  submitted_at=now, started_at=now, last_log_at=now))
            per_job = int(args.growth_mb * 1e6 / args.jobs)
            print(f"{args.jobs} RUNNING jobs, logs grow {per_job} B each ({args.growth_mb} MB in all) per tick")
            seconds, rates, rss = [], [], []
            speed_before = machine_speed()
            for t in range(args.ticks):
                for i, path in enumerate(logs):
                    with open(path, "ab") as f:
                        f.write(log_lines(i, t * 1000000, per_job, args.dense))
                if args.profile and t == (0 if args.profile_first else 1):
                    profiler.enable()
                r = app.ticker.tick()
                seconds.append(r.seconds)
                rates.append(r.events / r.seconds)
                rss.append(rss_mb())
                if t < 5 or t == args.ticks - 1 or t % max(1, args.ticks // 10) == 0:
                    print(f"tick {t + 1}: {r.seconds:.3f} s, {r.jobs} jobs, {r.bytes_read / 1e6:.2f} MB read, "
                          f"{r.events} events ({r.events / r.seconds:,.0f} samples/s), {r.quiet} on the fast path, "
                          f"RSS {rss_mb():.0f} MB")
            if args.profile:
                profiler.disable()
                profiler.dump_stats(args.profile)
            with app.sessions() as s:
                print(f"metric rows: {s.query(MetricSample).count()}")
            print(f"machine: sum(range(10**6)) {speed_before:.1f} ms before the ticks, {machine_speed():.1f} ms after")
            later = seconds[1:] or seconds  # the first tick also warms caches and imports
            print(f"median tick {sorted(later)[len(later) // 2]:.3f} s at {args.jobs} jobs, slowest {max(later):.3f} s "
                  f"(goal <= 1 s at 10,000 jobs with 10 MB of new log)")
            print(f"first tick {seconds[0]:.3f} s (this process's: every spec parsed, every runner verified, every "
                  f"parser built, the collector on, as a daemon's first; no goal)")
            if args.poll:
                for i, path in enumerate(logs):
                    with open(path, "ab") as f:
                        f.write(log_lines(i, args.ticks * 1000000, per_job, args.dense))
                t0 = time.perf_counter()
                p = subprocess.run([str(Path(sys.executable).parent / "orchd"), "poll"], capture_output=True,
                                   text=True, env={**os.environ, "ORCHD_HOME": tmp})
                wall = time.perf_counter() - t0
                said = p.stdout.strip().rsplit(";", 2)[-2].strip() if p.returncode == 0 else p.stderr.strip()[-300:]
                print(f"`orchd poll` (a fresh process, one tick, as from cron): {wall:.3f} s wall, its tick {said} "
                      f"(no goal)")
            print(f"median rate {sorted(rates)[len(rates) // 2]:,.0f} samples/s (goal >= 200,000 on a dense log)")
            print(f"RSS {rss[0]:.0f} MB after tick 1, {max(rss):.0f} MB at most, {rss[-1]:.0f} MB after tick "
                  f"{len(rss)} (goal <= 150 MB, flat, at 1,000 jobs)")
    finally:
        sleeper.kill()


if __name__ == "__main__":
    main()
