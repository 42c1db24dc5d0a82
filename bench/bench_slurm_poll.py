"""SLURM polling cost and latency against the local SLURM (scripts/start-local-slurm.sh).

    python bench/bench_slurm_poll.py

1. Commands per tick with 1, 10 and 100 live attempts (held jobs: `sbatch --hold`, so they
   stay PENDING and cost nothing): sacct calls, squeue calls.
2. Time from a job's end in SLURM (sacct End) to orchd's recorded final state, ticking at the
   default interval (5 s) from a daemon-like loop, over 5 short jobs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator import service  # noqa: E402
from orchestrator.config import DEFAULT_TICK_SECONDS  # noqa: E402
from orchestrator.models import Attempt, Job  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402

CONF = os.environ.get("SLURM_CONF", "/tmp/orchd-slurm/etc/slurm.conf")
ENV = {**os.environ, "SLURM_CONF": CONF}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.yaml").write_text(yaml.safe_dump({"clusters": {"lab": {
            "slurm_conf": CONF, "work_dir": f"{tmp}/cluster", "partition": "debug"}}}))
        app = service.open_app({"ORCHD_HOME": tmp})
        backend = app.backend("slurm:lab")
        spec = JobSpec.model_validate({"name": "held", "backend": "slurm", "cluster": "lab", "command": "true",
                                       "workdir": tmp})
        made = 0
        for n in (1, 10, 100):
            with app.sessions.begin() as s:
                while made < n:
                    out = subprocess.run(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "true"],
                                         env=ENV, capture_output=True, text=True, check=True).stdout.strip()
                    job = Job(name=f"held-{made}", backend="slurm:lab", state="PENDING", reason="QUEUED", detail="",
                              spec_json=spec.model_dump_json(), created_at=time.time())
                    s.add(job)
                    s.flush()
                    s.add(Attempt(job_id=job.id, number=1, state="PENDING", backend_id=f"{out}@{tmp}/none.log",
                                  submitted_at=time.time()))
                    made += 1
            app.ticker.tick()  # warm-up
            backend.calls.clear()
            r = app.ticker.tick()
            print(f"{n:4d} live attempts: sacct {backend.calls['sacct']}, squeue {backend.calls['squeue']} "
                  f"call(s) per tick; tick {r.seconds * 1000:.0f} ms")
        subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], env=ENV)
        with app.sessions.begin() as s:
            for job in s.query(Job):
                job.state, job.reason = "CANCELLED", "USER"

        lags = []
        for i in range(5):
            p = Path(tmp, f"s{i}.yaml")
            p.write_text(yaml.safe_dump({"name": f"short{i}", "backend": "slurm", "cluster": "lab",
                                         "command": "sleep 2", "workdir": tmp}))
            (job,) = service.submit(app, p)
            while True:
                app.ticker.tick()
                d = service.job_detail(app, job)
                if d["ended_at"]:
                    break
                time.sleep(DEFAULT_TICK_SECONDS)
            slurm_id = d["attempts"][0]["backend_id"].split("@")[0]
            end = subprocess.run(["sacct", "-X", "-n", "-P", "-j", slurm_id, "-o", "End"], env=ENV,
                                 capture_output=True, text=True).stdout.strip()
            lags.append(d["ended_at"] - datetime.fromisoformat(end).timestamp())
        print(f"end in SLURM -> final state in orchd at a {DEFAULT_TICK_SECONDS:.0f} s tick: median "
              f"{statistics.median(lags):.1f} s, max {max(lags):.1f} s over {len(lags)} jobs")


if __name__ == "__main__":
    main()
