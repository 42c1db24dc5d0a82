"""A training stand-in for the fault tests: it notes its start in ``$ORCHD_JOB_DIR/runs.txt``
(one line per run of an attempt: a second line for one attempt is a duplicate run), notes
``OVERLAP`` if any process of another attempt of its job still lives, prints ``STEPS`` numbered
``val_loss`` lines, then exits 3 on attempt 1 (so the job is retried) and 0 after. SIGTERM
takes it 2 s (a checkpoint being saved).

    python fault_workload.py STEPS SECONDS_PER_STEP
"""

import os
import signal
import sys
import time
from pathlib import Path

steps, pause = int(sys.argv[1]), float(sys.argv[2])
job_dir, attempt = Path(os.environ["ORCHD_JOB_DIR"]), int(os.environ["ORCHD_ATTEMPT"])
mine = os.environ.get("ORCHD_ATTEMPT_DIR", "").encode()  # set by the local backend only
others = []
for p in os.listdir("/proc"):
    try:
        env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        stat = Path(f"/proc/{p}/stat").read_text()
    except OSError:
        continue
    if stat[stat.rfind(")") + 2] == "Z":
        continue
    dirs = [e.split(b"=", 1)[1] for e in env if e.startswith(b"ORCHD_ATTEMPT_DIR=")]
    if mine and dirs and dirs[0] != mine and dirs[0].startswith(str(job_dir).encode() + b"/"):
        others.append(p)
with open(job_dir / "runs.txt", "a") as f:
    f.write(f"{attempt} {os.getpid()} {time.time():.3f}{' OVERLAP ' + ','.join(others) if others else ''}\n")
# like a trainer saving a checkpoint on SIGTERM: a stop takes a moment (a cancel must wait for it)
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(2), sys.exit(143)))
for step in range(1, steps + 1):
    time.sleep(pause)
    print(f"step {step} val_loss={1.0 / (step + attempt):.6f}", flush=True)
sys.exit(3 if attempt == 1 else 0)
