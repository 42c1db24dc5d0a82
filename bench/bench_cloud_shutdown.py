"""Billed seconds after a job's end until its instance is destroyed, with `orchd daemon` at its
default tick, against the Vast.ai or RunPod emulator (tests/emulators/; needs OpenSSH's sshd).

    python bench/bench_cloud_shutdown.py [--jobs 10] [--provider vastai|runpod]

A job "ends" when its exit status file is written on the instance (its mtime); the instance
stops billing when the emulator handles the destroy. Prints the median and max of the gap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator import service  # noqa: E402
from tests.emulators import runpod as rp_emu  # noqa: E402
from tests.emulators import vast as vast_emu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--provider", choices=["vastai", "runpod"], default="vastai")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / "k")], check=True)
        (t / "ak").write_text((t / "k.pub").read_text())
        image_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
        if args.provider == "vastai":
            emu = vast_emu.VastEmulator(t / "vast", t / "ak", path=image_path).start()
            section, key_env = {"server_url": emu.url}, {"VAST_API_KEY": vast_emu.API_KEY}
        else:
            emu = rp_emu.RunPodEmulator(t / "runpod", t / "ak", path=image_path).start()
            section, key_env = {"api_url": emu.url}, {"RUNPOD_API_KEY": rp_emu.API_KEY}
        home = t / "home"
        home.mkdir()
        work = t / "work"  # what is uploaded: a small workdir of its own
        work.mkdir()
        (work / "train.py").write_text("print('hi')\n")
        (home / "config.yaml").write_text(yaml.safe_dump({args.provider: {**section, "ssh_key": str(t / "k")}}))
        env = {**os.environ, "ORCHD_HOME": str(home), **key_env}
        env.pop("ORCHD_TICK_SECONDS", None)  # the default tick
        daemon_log = open(t / "daemon.log", "w")  # noqa: SIM115 - closed with the temporary directory
        daemon = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon"], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=daemon_log)
        try:
            spec = t / "s.yaml"
            spec.write_text(yaml.safe_dump({"name": "short", "backend": args.provider, "command": "sleep {n}",
                                            "workdir": str(work), "sweep": {"n": [3 + i % 4 for i in
                                                                                     range(args.jobs)]},
                                            "resources": {"gpu": ["RTX 4090"], "gpus_per_node": 1}}))
            sub = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(spec)], env=env, cwd=ROOT,
                                 check=True, capture_output=True, text=True)
            if "Traceback" in sub.stderr:
                print(sub.stderr[-3000:])
            app = service.open_app({"ORCHD_HOME": str(home)})
            deadline = time.time() + 300
            while time.time() < deadline:
                rows = service.job_summaries(app, include_all=True)
                if len(rows) == args.jobs and all(r["state"] not in ("PENDING", "RUNNING") for r in rows):
                    break
                time.sleep(1)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
        gaps = []
        for inst in emu.pool.hosts.values():
            ends = list(inst.dir.glob("home/orchd/*/exit_code"))
            if ends and inst.destroyed:
                gaps.append(inst.destroyed - ends[0].stat().st_mtime)
        states = sorted({r["state"] for r in rows})
        for r in rows:
            if r["state"] != "COMPLETED":
                print(f"job {r['id']}: {r['state']} {r['reason']}: {r['detail'][:300]}")
        if any(r["state"] != "COMPLETED" for r in rows):
            text = (t / "daemon.log").read_text()
            print(text[text.find("Traceback") - 300:][:4000] if "Traceback" in text else "(no traceback in the daemon)")
        if not gaps:
            raise SystemExit(f"no job ended on an instance: {[(r['state'], r['detail']) for r in rows]}")
        leaked = len(emu.pool.alive())
        emu.stop()
        print(f"{args.provider}: {len(gaps)} jobs ({states}), daemon tick {app.settings.tick_seconds:.0f} s: "
              f"billed seconds after the job's end: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s; "
              f"leaked instances: {leaked}")


if __name__ == "__main__":
    main()
