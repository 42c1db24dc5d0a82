"""The vastai and runpod backends against the emulators (tests/emulators/), whose instances are
real sshd processes that bill per second, every call checked against the provider's published
contract (tests/contracts/). Every test runs on both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator import service
from orchestrator.backends.vastai import RATE_LIMITS
from orchestrator.errors import BudgetError, ConfigError
from tests.conftest import ROOT, wait_for, write_spec
from tests.emulators import runpod as rp_emu
from tests.emulators import vast as vast_emu
from tests.emulators.hosts import tagged

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/sshd").exists() and not shutil.which("sshd"),
                                reason="needs OpenSSH's sshd (scripts/start-local-sshd.sh installs it)")


@dataclass
class Cloud:
    """One provider's emulator, an App configured for it, and what its offers mean for SPEC."""

    name: str
    emu: vast_emu.VastEmulator | rp_emu.RunPodEmulator
    app: service.App
    resources: str  # the spec's resources line
    cheapest: float  # $/hr of the cheapest offer that fits it
    fitting: int  # how many offers fit it

    def spec(self, command: str, extra: str = "") -> str:
        return (f"name: burgers-{self.name}\nbackend: {self.name}\ncommand: {command}\n{self.resources}\n"
                f"metrics: [val_loss, train_loss]\n{extra}")

    def reopen(self, **changes: object) -> service.App:
        """A new App after changing keys of this provider's config section."""
        cfg = yaml.safe_load(self.app.settings.config_path.read_text())
        cfg[self.name].update(changes)
        self.app.settings.config_path.write_text(yaml.safe_dump(cfg))
        self.app = service.open_app({"ORCHD_HOME": str(self.app.settings.home)})
        return self.app

    def rent_outside_orchd(self, label: str) -> str:
        """An instance created straight through the SDK (as a person would), returns its id."""
        import httpx

        if self.name == "vastai":
            for _ in range(50):  # the create's rate limit applies to people too
                r = httpx.put(f"{self.emu.url}/api/v0/asks/102/", json={"image": "x", "label": label},
                              headers={"Authorization": f"Bearer {vast_emu.API_KEY}"})
                if r.status_code != 429:
                    return str(r.json()["new_contract"])
                time.sleep(0.2)
            raise AssertionError("the emulator kept answering 429")
        r = httpx.post(f"{self.emu.url}/v2/pods", headers={"Authorization": f"Bearer {rp_emu.API_KEY}"},
                       json={"name": label, "image": "x", "gpu": {"id": "NVIDIA RTX A5000"}, "cloud": "COMMUNITY"})
        return r.json()["id"]


@pytest.fixture(params=["vastai", "runpod"])
def cloud(request, tmp_path: Path, home: Path, monkeypatch) -> Cloud:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_ed25519.pub").read_text())
    # the "image" has this venv's python (torch included), as a pytorch image would
    image_path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    if request.param == "vastai":
        # Vast's rate limits at a tenth of its documented thresholds, on both sides (the documented
        # ones are tested on their own: test_vast_parallel_launches_under_the_documented_rate_limits)
        emu = vast_emu.VastEmulator(tmp_path / "vast", tmp_path / "authorized_keys", path=image_path,
                                    rate_scale=0.1).start()
        monkeypatch.setenv("VAST_API_KEY", vast_emu.API_KEY)
        section = {"server_url": emu.url, "rate_limits": {k: v / 10 for k, v in RATE_LIMITS.items()}}
        # offers: RTX 4090 at 0.35 and 0.40 fit; the A100 (1.10) is over the cap, the RTX 3090 not accepted
        res, cheapest = "resources: {gpu: [RTX 4090, A100 SXM4], gpus_per_node: 1, max_usd_per_hour: 1.0}", 0.35
    else:
        # only the account's key file differs: RunPod pods authorise the PUBLIC_KEY orchd passes
        (tmp_path / "authorized_keys").write_text("")
        emu = rp_emu.RunPodEmulator(tmp_path / "runpod", tmp_path / "authorized_keys", path=image_path).start()
        monkeypatch.setenv("RUNPOD_API_KEY", rp_emu.API_KEY)
        section = {"api_url": emu.url}
        # RTX 4090 at 0.34 (community, cheaper of the two clouds) and A100 PCIe at 1.19 fit; A5000 not accepted
        res, cheapest = "resources: {gpu: [RTX 4090, A100 PCIe], gpus_per_node: 1, max_usd_per_hour: 2.0}", 0.34
    emu.pool.linger = 1.0  # a destroyed instance is listed a second longer: deletes are eventually consistent
    (home / "config.yaml").write_text(yaml.safe_dump({request.param: {**section, "ssh_key": str(key),
                                                                      "ssh_timeout": 15, "destroy_timeout": 20}}))
    c = Cloud(request.param, emu, service.open_app({"ORCHD_HOME": str(home)}), res, cheapest, 2)
    yield c
    emu.stop()
    # every call orchd made and every answer the emulator gave followed RunPod's published contract
    assert not getattr(emu, "violations", []), emu.violations[:10]


def run(app: service.App, ids: list[int], timeout: float = 180) -> list[dict]:
    def check():
        app.ticker.tick(lock_timeout=5)
        ds = [service.job_detail(app, i) for i in ids]
        return ds if all(d["ended_at"] for d in ds) else None

    return wait_for(check, timeout, interval=1.0, what="cloud jobs to end")


def submit_then_kill_the_daemon(app: service.App, spec: Path, until, what: str) -> tuple[int, object]:
    """Submit ``spec`` (not started here) to ``orchd daemon`` in a subprocess of ``app``'s home,
    and ``kill -9`` that daemon as soon as ``until()`` returns something: (job id, that thing)."""
    env = {**os.environ, "ORCHD_HOME": str(app.settings.home)}
    daemon = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon", "--interval", "1"], env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (job,) = service.submit(app, spec, start_now=False)
        return job, wait_for(until, 60, interval=0.02, what=what)
    finally:
        daemon.kill()  # SIGKILL: whatever the daemon was launching dies with it
        daemon.wait(10)


def until(app: service.App, job: int, state: str, timeout: float = 60) -> dict:
    def check():
        app.ticker.tick(lock_timeout=5)
        d = service.job_detail(app, job)
        return d if d["state"] == state or d["ended_at"] else None

    return wait_for(check, timeout, interval=0.5, what=f"job {job} {state}")


def second_home(a: service.App, tmp_path: Path) -> service.App:
    """Another orchd home (another host) on ``a``'s database, with ``a``'s config."""
    home_b = tmp_path / "home-b"
    home_b.mkdir()
    shutil.copy(a.settings.config_path, home_b / "config.yaml")
    return service.open_app({"ORCHD_HOME": str(home_b), "ORCHD_DB_URL": a.settings.db_url})


def assert_launched_again_once(d: dict, attempts: int = 2) -> list[dict]:
    """``d`` (a job's detail) COMPLETED, with ``attempts`` attempts, after its first attempt's
    launch was cut short: that attempt FAILED as an interrupted launch, one relaunch, its one
    value recorded once. Returns the attempts."""
    assert d["state"] == "COMPLETED", d
    got = d["attempts"]
    assert len(got) == attempts, got
    assert got[0]["state"] == "FAILED" and got[0]["reason"].startswith("launch failed: launch interrupted"), got[0]
    assert [x["kind"] for x in d["actions"]].count("relaunch") == 1, d["actions"]
    assert [(m["step"], m["value"]) for m in d["metrics"]["val_loss"]] == [(1, 0.25)]
    return got


def close_to_bill(usd: float, bill: dict, usd_per_hour: float) -> bool:
    """Within 1 % of what the emulator billed, give or take half a second of billing: orchd counts
    from the create's answer, the emulator from the create's arrival (its ssh-keygen and sshd
    start lie between, longer on a loaded machine); on an hour-long run that is 0.01 %."""
    return abs(usd - bill["usd"]) <= 0.01 * bill["usd"] + usd_per_hour * 0.5 / 3600


TRAIN = "python -m workloads.burgers --epochs 2"


@pytest.mark.slow
def test_burgers_end_to_end_then_destroyed(cloud, tmp_path):
    t0 = time.time()
    # slowed down a little: the run must still be going when a tick (paced by the provider's rate limits) sees val_loss
    spec = cloud.spec(TRAIN + " --step-delay 0.05", "artifacts: [checkpoints/latest.pt]\nsync: [workloads]\n")
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    assert time.time() - t0 < 3  # the launch (rent, SSH, upload) runs off the tick
    d = service.job_detail(cloud.app, job)
    assert d["state"] == "PENDING" and d["detail"].startswith(("LAUNCHING", "attempt 1 queued")), d["detail"]
    until(cloud.app, job, "RUNNING")
    time.sleep(1)
    cloud.app.ticker.tick(lock_timeout=5)
    (row,) = service.job_summaries(cloud.app)
    assert row["state"] == "RUNNING" and row["cost_usd"] > 0  # status shows the cost so far
    wait_for(lambda: cloud.app.ticker.tick(lock_timeout=5) and service.job_detail(cloud.app, job)["metrics"]
             .get("val_loss"), 120, interval=0.5, what="a first val_loss")
    (host,) = cloud.emu.pool.alive()
    assert cloud.emu.pool.drop_connections(host) >= 1  # the network drops; training goes on
    (d,) = run(cloud.app, [job])
    assert d["state"] == "COMPLETED", d
    assert [p["step"] for p in d["metrics"]["val_loss"]] == list(range(15, 91, 15))  # each once: none lost
    assert (host.dir / "sshd.log").read_text().count("Accepted publickey") >= 2  # it reconnected
    remote_log = host.dir / "home" / "orchd" / f"orchd-{job}-a1" / "output.log"
    mirror = cloud.app.settings.home / "cloud-logs" / f"orchd-{job}-a1.log"
    assert mirror.read_bytes() == remote_log.read_bytes()  # the local copy: whole, nothing twice
    backend = cloud.app.backend(cloud.name)
    assert not backend._launches and not backend._iids and not list(backend.launch_dir.iterdir())  # forgotten
    (inst,) = cloud.emu.pool.billing().values()
    assert inst["destroyed"] and inst["label"] == f"orchd-{job}-a1" and not cloud.emu.pool.alive()
    assert d["attempts"][0]["usd_per_hour"] == cloud.cheapest  # the cheapest fitting offer, price at launch
    assert close_to_bill(d["cost_usd"], inst, cloud.cheapest)  # orchd's cost = what was billed
    art = cloud.app.settings.jobs_dir / str(job) / "a1" / "artifacts" / "latest.pt"
    assert art.stat().st_size > 100_000
    kinds = [a["kind"] for a in d["actions"]]
    assert kinds[:4] == ["submit", "launch", "launch", "launch"], kinds  # then: rented, ssh up, uploaded
    assert any(a["kind"] == "destroy" and "checkpoints/latest.pt" in a["reason"] for a in d["actions"])
    # sync: [workloads] sent that directory only
    home = next(cloud.emu.pool.root.glob("instance-*/home"))
    assert sorted(p.name for p in (home / "orchd" / f"orchd-{job}-a1" / "code").iterdir()) == ["workloads"]


@pytest.mark.slow
def test_main_jobspec_through_the_cli(cloud, orchd_cli):
    """``orchd submit jobspecs/sota_push_v2_<provider>.yaml --wait``: the spec as shipped."""
    p = orchd_cli("submit", f"jobspecs/sota_push_v2_{cloud.name}.yaml", "--wait", timeout=400)
    job = int(p.stdout.split()[0])
    assert "LAUNCHING" in p.stderr and f"job {job} sota_push_v2_{cloud.name}: COMPLETED" in p.stderr, p.stderr
    d = service.job_detail(cloud.app, job)
    assert d["state"] == "COMPLETED" and d["success_met_at"] and not cloud.emu.pool.alive()
    assert (cloud.app.settings.jobs_dir / str(job) / "a1" / "artifacts" / "latest.pt").exists()
    show = orchd_cli("show", str(job)).stdout
    assert "launch" in show and "destroy" in show
    log = orchd_cli("logs", str(job)).stdout  # the instance is gone; its log is not
    assert "done: final val_loss=" in log and log.count("val_loss=") >= 18


@pytest.fixture
def orchd_cli(cloud):
    env = {**os.environ, "ORCHD_HOME": str(cloud.app.settings.home), "ORCHD_TICK_SECONDS": "1"}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"orchd {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        return p

    return run


@pytest.mark.slow
def test_eval_crash_after_training_fails_destroys_and_keeps_artifacts(cloud, tmp_path):
    crash = "python -m workloads.burgers --epochs 1 && python -c 'raise SystemExit(\"eval crashed\")'"
    spec = cloud.spec(crash, "artifacts: [checkpoints/latest.pt]\n")
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    (d,) = run(cloud.app, [job])
    assert d["state"] == "FAILED" and d["attempts"][0]["exit_code"] == 1
    assert not cloud.emu.pool.alive() and all(b["destroyed"] for b in cloud.emu.pool.billing().values())
    assert (cloud.app.settings.jobs_dir / str(job) / "a1" / "artifacts" / "latest.pt").exists()


def test_instance_without_ssh_is_destroyed_and_next_offer_tried(cloud, tmp_path):
    cloud.emu.pool.never_ssh = True  # running, says the provider; nothing answers on 22
    app = cloud.reopen(ssh_timeout=1, boot_timeout=1)
    (job,) = service.submit(app, write_spec(tmp_path, cloud.spec("'true'")))
    (d,) = run(app, [job], timeout=30)
    assert d["state"] == "FAILED" and d["reason"] == "SUBMIT_ERROR", d
    assert "gave no SSH within 1s" in d["detail"]
    assert len(cloud.emu.pool.hosts) == cloud.fitting and not cloud.emu.pool.alive()  # each tried, each destroyed
    bill = sum(b["usd"] for b in cloud.emu.pool.billing().values())
    assert d["cost_usd"] > 0 and abs(d["cost_usd"] - bill) <= 0.2 * bill  # what the failed launch was billed


def test_cancel_while_launching_destroys_what_was_rented(cloud, tmp_path):
    cloud.emu.pool.never_ssh = True  # the launch waits for SSH (up to 30 s) ...
    app = cloud.reopen(ssh_timeout=30)
    (job,) = service.submit(app, write_spec(tmp_path, cloud.spec("'true'")))
    # the phase is set once the create is answered, a moment after the emulator made the instance
    wait_for(lambda: app.ticker.tick(lock_timeout=5) and service.job_detail(app, job)["detail"]
             .startswith("LAUNCHING: waiting for SSH"), 10, what="the launch waiting for SSH")
    t0 = time.perf_counter()
    report = app.ticker.tick(lock_timeout=5)
    assert time.perf_counter() - t0 < 2 and report.jobs == 1  # ... and the tick does not wait with it
    assert cloud.emu.pool.alive()
    service.cancel(app, job)
    assert not cloud.emu.pool.alive()
    time.sleep(1.5)  # the launch thread notices and rents nothing more
    assert not cloud.emu.pool.alive() and len(cloud.emu.pool.hosts) == 1
    d = service.job_detail(app, job)
    assert d["state"] == "CANCELLED" and d["cost_usd"] > 0  # the seconds it was rented are counted


def test_a_destroy_that_fails_loses_no_other_jobs_record(cloud, tmp_path):
    cloud.reopen(destroy_timeout=4)  # how long the refused destroy holds its tick up
    # b's command ends as soon as it starts: orchd sees it ended before it saw it running
    spec = write_spec(tmp_path, cloud.spec("sleep {n}", "sweep: {n: [1, 0]}\n"))
    a, b = service.submit(cloud.app, spec, start_now=False)
    cloud.emu.pool.undying.add(f"orchd-{b}-a1")  # the provider refuses to destroy b's instance
    until(cloud.app, a, "COMPLETED")
    wait_for(lambda: cloud.app.ticker.tick(lock_timeout=5) and cloud.emu.pool.refused, 20,
             what="b ended and its destroy refused")
    stuck = next(h for h in cloud.emu.pool.hosts.values() if h.label == f"orchd-{b}-a1")
    da, db = service.job_detail(cloud.app, a), service.job_detail(cloud.app, b)
    assert da["state"] == "COMPLETED" and any(x["kind"] == "destroy" for x in da["actions"])
    # that it ran is recorded, and its instance kept, to be destroyed again: not forgotten
    assert db["state"] == "RUNNING" and db["started_at"] and stuck in cloud.emu.pool.alive()
    launched = [[x["reason"].split()[0] for x in d["actions"] if x["kind"] == "launch"] for d in (da, db)]
    assert launched[1] == launched[0] == ["rented", "ssh", "uploaded"]  # each step of its launch, once
    cloud.emu.pool.undying.clear()
    (db,) = run(cloud.app, [b], timeout=30)
    assert db["state"] == "COMPLETED" and not cloud.emu.pool.alive()


def test_create_failing_after_allocation_leaves_nothing(cloud, tmp_path):
    cloud.emu.fail_after_alloc = True
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec("'true'")))
    (d,) = run(cloud.app, [job], timeout=30)
    assert d["state"] == "FAILED" and d["reason"] == "SUBMIT_ERROR"
    assert cloud.emu.pool.hosts and not cloud.emu.pool.alive()


def test_reconcile_destroys_orphans_and_keeps_owned(cloud, tmp_path):
    orphan = cloud.rent_outside_orchd("orchd-999-a1")
    foreign = cloud.rent_outside_orchd("my-notebook")
    assert cloud.app.ticker.reconcile() == {cloud.name: [orphan]}
    assert {h.id for h in cloud.emu.pool.alive()} == {foreign}  # not ours: left alone


@pytest.mark.slow
def test_sweep_with_20_percent_api_faults_leaks_nothing(cloud, tmp_path):
    cloud.emu.faults.fail_rate = 0.2
    cloud.emu.faults.slow_rate, cloud.emu.faults.slow_seconds = 0.05, 0.5
    spec = write_spec(tmp_path, cloud.spec("sleep {n}", "sweep: {n: [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]}\n"))
    ids = service.submit(cloud.app, spec, start_now=False)
    ds = run(cloud.app, ids, timeout=240)
    assert sum(d["state"] == "COMPLETED" for d in ds) >= 8, [d["detail"] for d in ds]
    time.sleep(0.5)
    cloud.emu.faults.fail_rate = 0
    cloud.app.ticker.reconcile()
    assert not cloud.emu.pool.alive(), [(h.id, h.label) for h in cloud.emu.pool.alive()]  # 0 leaked instances


@pytest.mark.slow
def test_budget_stops_the_instance_at_the_limit(cloud, tmp_path):
    # ~$0.35/hr: a $0.0008 budget lasts ~8 s
    spec = write_spec(tmp_path, cloud.spec("sleep 120", "budget: {max_usd: 0.0008}\n"))
    (job,) = service.submit(cloud.app, spec)
    until(cloud.app, job, "RUNNING")
    (host,) = cloud.emu.pool.alive()
    assert tagged(f"ORCHD_EMU_INSTANCE={cloud.emu.pool.tag(host.id)}")  # the job's sleep runs on the instance
    (d,) = run(cloud.app, [job], timeout=60)
    assert d["state"] == "CANCELLED" and d["reason"] == "BUDGET"
    assert not tagged(f"ORCHD_EMU_INSTANCE={cloud.emu.pool.tag(host.id)}")  # destroyed: nothing of it runs
    (inst,) = cloud.emu.pool.billing().values()
    assert inst["destroyed"] and inst["usd"] <= 0.0008 + cloud.cheapest / 3600 * 2  # overshoot <= a tick + teardown
    assert close_to_bill(service.costs(cloud.app, "job")[-1]["usd"], inst, cloud.cheapest)


def test_idle_instance_is_released(cloud, tmp_path):
    cmd = "python -c \"print('step 1/9 train_loss=1.0', flush=True); import time; time.sleep(120)\""
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec(cmd, "shutdown: {idle: 3s}\n")))
    (d,) = run(cloud.app, [job], timeout=60)
    assert (d["state"], d["reason"]) == ("CANCELLED", "IDLE") and "no log output" in d["detail"]
    assert d["metrics"]["train_loss"][0]["value"] == 1.0  # it did run, then went quiet
    (inst,) = cloud.emu.pool.billing().values()
    assert inst["destroyed"] and inst["seconds"] < 20


def test_projected_cost_is_the_price_cap_times_the_time_limit(cloud, tmp_path):
    spec = cloud.spec("sleep 1", "budget: {max_usd: 0.5}\n")
    spec = spec.replace("max_usd_per_hour", "time_limit: 1h, max_usd_per_hour")
    with pytest.raises(BudgetError, match=r"projected \$[12]\.00 exceeds its budget.max_usd \$0\.50"):
        service.submit(cloud.app, write_spec(tmp_path, spec))
    assert service.job_summaries(cloud.app) == [] and not cloud.emu.pool.hosts


def test_time_limit_ends_in_timeout(cloud, tmp_path):
    spec = cloud.spec("sleep 60").replace("max_usd_per_hour", "time_limit: 2s, max_usd_per_hour")
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    (d,) = run(cloud.app, [job], timeout=40)
    assert (d["state"], d["reason"], d["attempts"][0]["exit_code"]) == ("TIMEOUT", "TIME_LIMIT", 124)
    assert not cloud.emu.pool.alive()


def test_runpod_strings_arrive_intact_and_sold_out_types_skipped(cloud, tmp_path):
    if cloud.name != "runpod":
        pytest.skip("RunPod's catalog and its stock levels")
    cloud.emu.no_capacity.add("NVIDIA GeForce RTX 4090")  # the cheapest type is sold out: the next one is rented
    image = 'my"image:latest\nwith-newline'
    spec = cloud.spec("sleep 30").replace("max_usd_per_hour: 2.0", f"max_usd_per_hour: 2.0, image: {json.dumps(image)}")
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    d = until(cloud.app, job, "RUNNING")
    assert d["state"] == "RUNNING", d["detail"]
    (host,) = cloud.emu.pool.hosts.values()
    assert host.meta["image"] == image and host.meta["gpu"]["name"] == "A100 PCIe"
    assert d["attempts"][0]["usd_per_hour"] == 1.19


def test_runpod_cloud_type_secure_prices_the_secure_cloud(cloud, tmp_path):
    if cloud.name != "runpod":
        pytest.skip("cloud_type is RunPod's")
    spec = cloud.spec("sleep 30").replace("max_usd_per_hour: 2.0", "max_usd_per_hour: 2.0, cloud_type: SECURE")
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    d = until(cloud.app, job, "RUNNING")
    assert d["attempts"][0]["usd_per_hour"] == 0.69  # not the 0.34 community price


def test_api_key_missing_or_wrong_is_named_never_stored(cloud, tmp_path, monkeypatch):
    var = "VAST_API_KEY" if cloud.name == "vastai" else "RUNPOD_API_KEY"
    monkeypatch.delenv(var)
    app = service.open_app({"ORCHD_HOME": str(cloud.app.settings.home)})
    with pytest.raises(ConfigError, match=rf"\${var} is not set"):
        service.submit(app, write_spec(tmp_path, cloud.spec("'true'")))
    assert service.job_summaries(app) == []  # refused before anything was written
    secret = "sk-WRONG-0123456789abcdef"
    monkeypatch.setenv(var, secret)
    app = service.open_app({"ORCHD_HOME": str(cloud.app.settings.home)})
    (job,) = service.submit(app, write_spec(tmp_path, cloud.spec("'true'")))
    (d,) = run(app, [job], timeout=30)
    assert d["state"] == "FAILED" and d["reason"] == "SUBMIT_ERROR" and not cloud.emu.pool.hosts
    assert secret not in d["detail"]
    stored = list(app.settings.home.glob("orchd.db*"))  # the database and its WAL
    assert stored and not any(secret.encode() in f.read_bytes() for f in stored)


def test_budget_applies_to_an_instance_another_process_launched(cloud, tmp_path):
    """``orchd submit`` (no --wait) launches the instance; a daemon in another process must know
    its price from the provider and stop it at the budget (before: $0 and no stop)."""
    env = {**os.environ, "ORCHD_HOME": str(cloud.app.settings.home)}
    spec = write_spec(tmp_path, cloud.spec("sleep 120", "budget: {max_usd: 0.001}\n"))
    daemon = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "daemon", "--interval", "1"], env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(spec)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        job = int(p.stdout.split()[0])
        wait_for(lambda: service.job_detail(cloud.app, job)["ended_at"], 90, what="the budget stop")
    finally:
        daemon.terminate()
        daemon.wait(30)
    d = service.job_detail(cloud.app, job)
    assert (d["state"], d["reason"]) == ("CANCELLED", "BUDGET")
    (inst,) = cloud.emu.pool.billing().values()
    assert inst["destroyed"] and inst["usd"] <= 0.001 + cloud.cheapest / 3600 * 3  # <= a tick + teardown over
    assert d["attempts"][0]["usd_per_hour"] == pytest.approx(cloud.cheapest)
    assert d["cost_usd"] >= 0.001 and d["cost_usd"] >= inst["usd"] * 0.99  # counted from the submit: never less


def test_secrets_reach_neither_the_instance_nor_the_log(cloud, tmp_path, monkeypatch):
    """orchd's environment holds the provider key and the SMTP password; the workdir holds an
    SSH key, a .env and orchd's own home: the instance gets none of them, the job's `env` shows
    none, and the database holds none."""
    monkeypatch.setenv("ORCHD_SMTP_PASSWORD", "smtp-secret-cloud")
    key = os.environ["VAST_API_KEY" if cloud.name == "vastai" else "RUNPOD_API_KEY"]
    work = tmp_path / "work"
    (work / ".ssh").mkdir(parents=True)
    (work / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (work / ".env").write_text(f"KEY={key}")
    (work / "train.py").write_text("print('step 1 val_loss=0.5')")
    spec = write_spec(tmp_path, cloud.spec("env; python train.py", f"workdir: {work}\n"))
    (job,) = service.submit(cloud.app, spec)
    (d,) = run(cloud.app, [job], timeout=90)
    assert d["state"] == "COMPLETED", d
    log = (cloud.app.settings.home / "cloud-logs" / f"orchd-{job}-a1.log").read_text()
    assert "ORCHD_JOB_ID=" in log and "val_loss=0.5" in log
    uploaded = [p.relative_to(cloud.emu.root) for p in cloud.emu.root.rglob("*") if "code" in p.parts]
    assert any(p.name == "train.py" for p in uploaded)
    assert not [p for p in uploaded if p.name in (".env", ".ssh", "id_ed25519")]
    db = (cloud.app.settings.home / "orchd.db").read_bytes()
    for secret in (key, "smtp-secret-cloud"):
        assert secret not in log and secret.encode() not in db


def test_contract_validator_rejects_what_runpod_would():
    """The validator the RunPod emulator runs is not a rubber stamp: a wrong field name, a missing
    required field and an undocumented parameter are each caught."""
    from tests.emulators.runpod import CONTRACT

    good = {"name": "orchd-1-a1", "image": "pytorch/pytorch:latest", "gpu": {"id": "NVIDIA GeForce RTX 4090",
            "count": 1}, "cloud": "COMMUNITY", "disk": 20, "ports": ["22/tcp"], "startSsh": True, "env": {"A": "b"}}
    assert CONTRACT.check_request("POST", "/v2/pods", {}, good) == []
    assert CONTRACT.check_request("POST", "/v2/pods", {}, {**good, "imageName": "x"})  # GraphQL's field name
    assert CONTRACT.check_request("POST", "/v2/pods", {}, {**good, "gpu": {"id": "x", "count": 0}})
    assert CONTRACT.check_request("GET", "/v2/catalog/gpus", {"gpuCount": ["1"]}, None)
    assert CONTRACT.check_response("GET", "/v2/pods/x", 200, {"id": "x", "name": "n"})
    assert CONTRACT.check_request("GET", "/v2/pods/x/ssh", {}, None)  # not an operation at all


def test_runpod_wrong_field_is_answered_422_and_recorded(cloud):
    if cloud.name != "runpod":
        pytest.skip("RunPod's contract")
    import httpx

    r = httpx.post(f"{cloud.emu.url}/v2/pods", headers={"Authorization": f"Bearer {rp_emu.API_KEY}"},
                   json={"name": "x", "imageName": "y", "gpu": {"id": "NVIDIA RTX A5000"}})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert any("imageName" in v for v in cloud.emu.violations)
    cloud.emu.violations.clear()  # the fixture asserts none are left: this one was the test's own


def test_runpod_slow_boot_and_failed_pod(cloud, tmp_path):
    """A pod that provisions longer than ssh_timeout still runs (boot_timeout covers the pull);
    a pod the provider reports in ERROR is given up at once and the next offer tried."""
    if cloud.name != "runpod":
        pytest.skip("RunPod's pod statuses")
    cloud.emu.boot_seconds = 20.0  # ssh_timeout is 15 s in these tests
    cloud.emu.fail_first_with = "ERROR"
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")))
    (d,) = run(cloud.app, [job], timeout=120)
    assert d["state"] == "COMPLETED", d
    steps = [a["reason"] for a in d["actions"] if a["kind"] == "launch"]
    assert any("rented" in s for s in steps)
    first, second = sorted(cloud.emu.pool.hosts.values(), key=lambda h: h.created)
    assert first.destroyed and first.destroyed - first.created < 10  # not waited out
    assert d["attempts"][0]["usd_per_hour"] == pytest.approx(second.usd_per_hour)


def test_instance_stopped_by_the_provider_ends_the_attempt_and_is_retried(cloud, tmp_path):
    """Mid-training the provider reports the instance stopped (RunPod EXITED, Vast exited): the
    attempt ends NODE_FAIL (BACKEND_LOST) within a tick, the instance is destroyed, and
    ``retry.on: [NODE_FAIL]`` runs the job to COMPLETED on a new one."""
    cmd = ("python -c \"import time; [print(f'step {i} val_loss=0.5', flush=True) or time.sleep(0.5) "
           "for i in range(12)]\"")
    spec = cloud.spec(cmd, 'retry: {max_attempts: 2, backoff: 1s, on: [NODE_FAIL]}\n')
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    until(cloud.app, job, "RUNNING")
    (host,) = cloud.emu.pool.alive()
    host.meta["status"] = "EXITED" if cloud.name == "runpod" else "exited"
    signalled = time.time()
    (d,) = run(cloud.app, [job], timeout=120)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 2, d["attempts"]
    assert d["attempts"][0]["state"] == "NODE_FAIL" and "BACKEND_LOST" in d["attempts"][0]["reason"]
    assert host.destroyed is not None and host.destroyed - signalled < 5  # within a tick or two


@pytest.mark.parametrize("fault", ["restarted", "new host key", "deleted", "offline"])
def test_instance_lost_mid_training_ends_the_attempt_and_a_retry_completes(cloud, tmp_path, fault):
    """Behind orchd's back, mid-training, the provider restarts the container (its processes die,
    its files stay), re-creates it with new host keys, deletes it, or takes it offline (Vast
    ``offline``; RunPod says ``ERROR``): the attempt ends NODE_FAIL (BACKEND_LOST) within a tick
    or two, the instance is destroyed (billing stops), nothing more is sent to a host whose key
    changed, and ``retry.on: [NODE_FAIL]`` completes the job on a new instance."""
    cmd = ("python -c \"import time; [print(f'step {i} val_loss=0.5', flush=True) or time.sleep(0.5) "
           "for i in range(12)]\"")
    spec = cloud.spec(cmd, "retry: {max_attempts: 2, backoff: 1s, on: [NODE_FAIL]}\n")
    (job,) = service.submit(cloud.app, write_spec(tmp_path, spec))
    until(cloud.app, job, "RUNNING")
    (host,) = cloud.emu.pool.alive()
    signalled = time.time()
    if fault == "restarted":
        cloud.emu.pool.restart(host)
    elif fault == "new host key":
        cloud.emu.pool.restart(host, new_host_key=True)
        sessions = (host.dir / "sshd.log").read_text().count("Accepted publickey")
    elif fault == "deleted":
        cloud.emu.pool.destroy(host)
    else:
        host.meta["status"] = "offline" if cloud.name == "vastai" else "ERROR"
    (d,) = run(cloud.app, [job], timeout=120)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 2, d["attempts"]
    first = d["attempts"][0]
    assert first["state"] == "NODE_FAIL" and "BACKEND_LOST" in first["reason"], first
    assert first["ended_at"] - signalled < 6, first  # a tick or two (each about a second here)
    assert host.destroyed is not None and host.destroyed - signalled < 8
    if fault == "new host key":
        assert "host key CHANGED" in first["reason"]
        assert (host.dir / "sshd.log").read_text().count("Accepted publickey") == sessions  # nothing sent
    assert len(cloud.emu.pool.hosts) == 2 and not cloud.emu.pool.alive()


def test_vast_parallel_launches_under_the_documented_rate_limits(cloud, tmp_path, capsys):
    """10 jobs launched at once against Vast's documented thresholds (create one per 4.5 s, show
    2 s, list 1 s, destroy 3 s): all complete, none leaks, every 429 is counted and waited out."""
    if cloud.name != "vastai":
        pytest.skip("Vast's documented rate limits")
    cloud.emu.rate_scale = 1.0
    app = cloud.reopen(rate_limits={}, max_parallel_launches=10)  # orchd's defaults: the documented ones
    ids = service.submit(app, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.{n}",
                                                              "sweep: {n: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n")))
    t0 = time.time()
    ds = run(app, ids, timeout=400)
    assert [d["state"] for d in ds] == ["COMPLETED"] * 10, [(d["state"], d["detail"]) for d in ds]
    assert len(cloud.emu.pool.hosts) == 10 and not cloud.emu.pool.alive()  # one instance each, none left
    creates = sorted(h.created for h in cloud.emu.pool.hosts.values())
    assert min(b - a for a, b in zip(creates, creates[1:], strict=False)) >= 4.0  # paced, not refused
    backend = app.backend("vastai")
    assert backend.rate_limited == cloud.emu.rate_limited  # each 429 was seen (and retried)
    with capsys.disabled():
        print(f"\n10 Vast launches under the documented rate limits: {time.time() - t0:.0f}s, "
              f"{cloud.emu.rate_limited} × 429 received")


def test_a_malformed_listing_is_no_news_never_a_loss(cloud, tmp_path):
    """The provider answers its instance list with an object where the list belongs (the answer
    that once crashed the vastai SDK): no news for the tick, no attempt taken for lost, no crash."""
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec("sleep 3; echo step 1 val_loss=0.5")))
    until(cloud.app, job, "RUNNING")
    cloud.emu.malformed_lists = 8  # more than one tick's retries
    for _ in range(2):
        report = cloud.app.ticker.tick(lock_timeout=5)
        assert service.job_detail(cloud.app, job)["state"] == "RUNNING", report
    cloud.emu.malformed_lists = 0
    (d,) = run(cloud.app, [job], timeout=60)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1 and not cloud.emu.pool.alive()


def test_vast_contract_validator_rejects_what_vast_would():
    """The Vast contract check is not a rubber stamp: the bodies the vastai SDK 1.9.1 sends (why
    orchd does not use it), an oversized page and a wrongly typed answer are each caught, while
    what orchd sends passes."""
    from tests.emulators.vast import CONTRACT

    search = {"verified": {"eq": True}, "rentable": {"eq": True}, "num_gpus": {"eq": 1}, "type": "ondemand",
              "gpu_name": {"in": ["RTX 4090"]}, "limit": 64, "order": [["dph_total", "asc"], ["reliability", "desc"]]}
    assert CONTRACT.check_request("POST", "/api/v0/bundles/", {}, search) == []
    assert CONTRACT.check_request("POST", "/api/v0/bundles/", {}, {**search, "type": "on-demand"})  # the SDK's
    create = {"image": "pytorch/pytorch", "label": "orchd-1-a1", "disk": 10.0, "runtype": "ssh_direct"}
    assert CONTRACT.check_request("PUT", "/api/v0/asks/101/", {}, create) == []
    assert CONTRACT.check_request("PUT", "/api/v0/asks/101/", {}, {**create, "runtype": "ssh_direc ssh_proxy"})
    assert CONTRACT.check_request("PUT", "/api/v0/asks/101/", {}, {**create, "image": None})
    assert CONTRACT.check_request("GET", "/api/v1/instances/", {"limit": ["25"]}, None) == []
    assert CONTRACT.check_request("GET", "/api/v1/instances/", {"limit": ["100"]}, None)  # pages hold 25
    assert CONTRACT.check_response("GET", "/api/v1/instances/", 200, {"instances": [{"id": "5001"}]})


def test_a_destroyed_instance_still_listed_is_waited_for(cloud):
    """Deletes are eventually consistent: an instance listed for a while after its destroy was
    answered is not called gone until a later listing drops it; billing stopped at the answer."""
    cloud.emu.pool.linger = 3.0
    backend = cloud.app.backend(cloud.name)
    iid = cloud.rent_outside_orchd("orchd-999-a1")
    t0 = time.time()
    stopped = backend.destroy(iid)
    host = cloud.emu.pool.hosts[iid]
    assert time.time() - t0 >= 3.0 and host.destroyed is not None
    assert abs(stopped - host.destroyed) < 1.0


@pytest.mark.parametrize("restarted", [False, True], ids=["same daemon", "restarted daemon"])
def test_unreachable_instance_is_ended_after_no_news_timeout_and_resumed(cloud, tmp_path, restarted):
    """The instance still bills and is listed as running, but nothing answers on it (its sshd
    died): after ``no_news_timeout`` the attempt ends NODE_FAIL (BACKEND_LOST), the instance is
    destroyed, and ``retry.on: [NODE_FAIL]`` completes the job on a new one. Also when the orchd
    process that launched it was restarted since (before: a process that had not launched it took
    the silence for "still launching elsewhere", which counted as news, forever)."""
    app = cloud.reopen(no_news_timeout=4)
    cmd = "python -c \"import time; print('step 1 val_loss=0.5', flush=True); time.sleep(8)\""
    spec = cloud.spec(cmd, "retry: {max_attempts: 2, backoff: 1s, on: [NODE_FAIL]}\n")
    (job,) = service.submit(app, write_spec(tmp_path, spec))
    until(app, job, "RUNNING")
    if restarted:
        app = cloud.reopen()  # a new process: its backend launched nothing
    (host,) = cloud.emu.pool.alive()
    cloud.emu.pool.drop_connections(host)  # orchd's open sessions, then the listener: nothing answers
    host.sshd.kill()
    silenced = time.time()
    (d,) = run(app, [job], timeout=120)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 2, d["attempts"]
    first = d["attempts"][0]
    assert first["state"] == "NODE_FAIL" and "no news" in first["reason"], first
    assert host.destroyed is not None and 4 <= host.destroyed - silenced < 12


def test_orchd_ends_an_attempt_past_its_time_limit_when_the_instance_does_not(cloud, tmp_path):
    app = cloud.reopen(time_limit_grace=1, no_news_timeout=600)
    spec = cloud.spec("sleep 120").replace("max_usd_per_hour: ", "time_limit: 4s, max_usd_per_hour: ")
    (job,) = service.submit(app, write_spec(tmp_path, spec))
    until(app, job, "RUNNING")
    (host,) = cloud.emu.pool.alive()
    cloud.emu.pool.drop_connections(host)  # nobody on the instance will report its `timeout`
    host.sshd.kill()
    (d,) = run(app, [job], timeout=60)
    assert (d["state"], d["attempts"][0]["state"]) == ("TIMEOUT", "TIMEOUT"), d
    assert "ended by orchd" in d["attempts"][0]["reason"] and host.destroyed is not None


def test_reconcile_pages_through_60_instances(cloud):
    """60 orphans labelled orchd-* (3 pages of Vast's 25) and one that is not orchd's: reconcile
    destroys every orphan and leaves the other alone."""
    if cloud.name != "vastai":
        pytest.skip("Vast's list is paged; RunPod's /v2/pods is one answer")
    cloud.emu.pool.never_ssh = True  # 61 sshd would be slow; no SSH is needed here
    offer = next(o for o in vast_emu.OFFERS if o["id"] == 102)
    for i in range(60):
        cloud.emu._create(offer, f"orchd-{900 + i}-a1")
    mine = cloud.emu._create(offer, "my-notebook")
    done = cloud.app.ticker.reconcile()
    assert len(done["vastai"]) == 60
    assert [h.id for h in cloud.emu.pool.alive()] == [mine.id]


def test_a_stale_listing_is_not_taken_for_a_lost_instance(cloud, tmp_path, monkeypatch):
    """The provider's list was taken just before another process finished a launch (and let go
    of its launch lock): the instance is asked for again, not declared lost (it was: BACKEND_LOST)."""
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec("sleep 30")))
    d = until(cloud.app, job, "RUNNING")
    backend = cloud.app.backend(cloud.name)
    real = backend.list_instances
    calls = []

    def stale_once():
        calls.append(1)
        return [] if len(calls) == 1 else real()

    monkeypatch.setattr(backend, "list_instances", stale_once)
    backend._launches.clear()  # as in a process that did not launch it
    obs = backend.poll([d["attempts"][0]["backend_id"]])
    assert len(calls) == 2 and not any(o.state.terminal for o in obs.values()), obs
    monkeypatch.setattr(backend, "list_instances", real)
    service.cancel(cloud.app, job)


def test_vast_bills_gpu_time_from_running_not_while_loading(cloud, tmp_path):
    """Vast charges an instance's $/hr from ``running`` (the image pull is not billed): an instance
    that loads for 6 s costs what its running time costs, as the emulator bills it: never less
    (give or take the half second between orchd's and the emulator's clocks), at most the time
    between two looks more."""
    if cloud.name != "vastai":
        pytest.skip("Vast's billing")
    cloud.emu.boot_seconds = 6.0
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec("sleep 2; echo step 1 val_loss=0.2")))
    (d,) = run(cloud.app, [job], timeout=90)
    (bill,) = cloud.emu.pool.billing().values()
    assert d["state"] == "COMPLETED", d
    # orchd knows "running" to within a listing interval (1 s here) plus its 1 s wait between looks
    assert bill["usd"] - cloud.cheapest * 0.5 / 3600 <= d["cost_usd"] <= bill["usd"] + cloud.cheapest * 2.2 / 3600
    (host,) = cloud.emu.pool.hosts.values()
    assert d["cost_usd"] < cloud.cheapest * (host.destroyed - host.created) / 3600  # the 6 s of loading are free


def test_two_homes_on_one_database_never_take_each_others_launch(cloud, tmp_path, monkeypatch):
    """Two orchd homes (two hosts, as far as their lock files go) tick one database. While home
    A's instance answers SSH and A is still uploading, home B's ticks see A's launch lease in the
    database and leave the launch alone: one attempt, one instance, COMPLETED, each value once.
    The lease is committed with the attempt's intent, so a launcher whose first renewal comes
    late (a busy database, a starved thread: a flaky CI run) is covered from the start.
    (Before leases, B took it for a launch whose orchd had died: it destroyed the instance and
    launched attempt 2, while A, its upload cut, went on to its next offer.)"""
    a = cloud.app
    b = second_home(a, tmp_path)
    launcher = a.backend(cloud.name)
    upload = launcher._upload

    def slow_upload(*args, **kwargs):  # B ticks a dozen times while A uploads
        time.sleep(8)
        return upload(*args, **kwargs)

    monkeypatch.setattr(launcher, "_upload", slow_upload)
    write_lease, late = launcher.lease_writer, []

    def late_first_write(label, until):  # the launcher's thread starved or the database busy at first:
        if not late:  # the lease committed with the attempt's intent holds until the renewals come
            late.append(time.sleep(12))
        write_lease(label, until)

    monkeypatch.setattr(launcher, "lease_writer", late_first_write)
    (job,) = service.submit(a, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")))
    b_ticks_during_upload = 0

    def both_homes_tick():
        nonlocal b_ticks_during_upload
        uploading = any(la.phase.startswith("uploading") for la in launcher._launches.values())
        b.ticker.tick(lock_timeout=5)
        b_ticks_during_upload += uploading
        a.ticker.tick(lock_timeout=5)
        d = service.job_detail(a, job)
        return d if d["ended_at"] else None

    d = wait_for(both_homes_tick, 120, interval=0.5, what="the job to end under two homes")
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1, (d["attempts"], d["actions"])
    kinds = [x["kind"] for x in d["actions"]]
    assert "relaunch" not in kinds and kinds.count("destroy") == 1, d["actions"]
    assert [(m["step"], m["value"]) for m in d["metrics"]["val_loss"]] == [(1, 0.25)]
    hosts = list(cloud.emu.pool.hosts.values())
    assert len(hosts) == 1 and hosts[0].destroyed  # one instance, and nothing left billing
    assert b_ticks_during_upload >= 3, b_ticks_during_upload
    with a.sessions() as s:  # written by the launcher, left to lapse after it
        from orchestrator.models import Attempt

        lease = s.query(Attempt.launch_lease_until).scalar()
        assert lease is not None and lease <= time.time() + 120


@pytest.mark.parametrize("boots", ["later", "never"])
def test_daemon_killed_mid_launch_the_job_is_launched_again(cloud, tmp_path, boots):
    """``kill -9`` of the daemon while the instance it rented boots: nobody launches it any more.
    The next orchd process destroys it once it answers with nothing started (or, when it never
    answers, at ``launch_timeout`` = boot_timeout + ssh_timeout from the submit) and launches the
    job anew on a new attempt, to COMPLETED: nothing left billing, each value recorded once."""
    app = cloud.reopen(boot_timeout=6, ssh_timeout=6)  # launch_timeout 12 s
    cloud.emu.boot_seconds = 3.0
    job, (first,) = submit_then_kill_the_daemon(  # while the instance boots
        app, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")),
        lambda: list(cloud.emu.pool.hosts.values()) or None, "the daemon to rent an instance")
    assert time.time() - first.created < cloud.emu.boot_seconds, "killed too late to test a launch cut short"
    if boots == "never":  # stuck in the provider's boot for good; the next instance boots at once
        first.meta["status"] = "loading" if cloud.name == "vastai" else "PROVISIONING"
        cloud.emu.boot_seconds = 0.0
    (d,) = run(app, [job], timeout=120)
    assert d["state"] == "COMPLETED", d
    a1, a2 = d["attempts"]
    assert a1["state"] == "FAILED" and a1["reason"].startswith("launch failed: launch interrupted"), a1
    assert a2["state"] == "COMPLETED"
    assert any(a["kind"] == "relaunch" for a in d["actions"])
    assert [(m["step"], m["value"]) for m in d["metrics"]["val_loss"]] == [(1, 0.25)]
    hosts = list(cloud.emu.pool.hosts.values())
    assert len(hosts) == 2 and all(h.destroyed for h in hosts)  # 0 left billing
    submitted = d["attempts"][0]["submitted_at"]
    if boots == "never":  # destroyed at the launch timeout, give or take a tick
        assert first.destroyed - submitted < 12 + 5, first.destroyed - submitted
    else:  # destroyed as soon as it answered with nothing started
        assert first.destroyed - (first.created + 3.0) < 5, first.destroyed - first.created


def test_cron_poll_that_starts_a_launch_sees_it_through(cloud, tmp_path):
    """``orchd poll`` from cron starts a job's launch, which runs off the tick for a while: the
    process exits only once the command runs on the instance (the launch is not cut short by
    its exit), and the next poll finds it running: one attempt, one instance, COMPLETED."""
    cloud.emu.boot_seconds = 2.0
    env = {**os.environ, "ORCHD_HOME": str(cloud.app.settings.home)}
    (job,) = service.submit(cloud.app, write_spec(tmp_path, cloud.spec("sleep 3; echo step 1 val_loss=0.25")),
                            start_now=False)
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "poll"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "1 started" in p.stdout, (p.stdout, p.stderr)
    (host,) = cloud.emu.pool.hosts.values()
    assert not host.destroyed and list(host.dir.rglob("output.log")), "the poll exited before the command started"

    def poll_once():
        q = subprocess.run([sys.executable, "-m", "orchestrator.cli", "poll"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stderr
        d = service.job_detail(cloud.app, job)
        return d if d["ended_at"] else None

    d = wait_for(poll_once, 90, interval=1.0, what="the job to end under cron polls")
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1, (d["attempts"], d["actions"])
    assert [(m["step"], m["value"]) for m in d["metrics"]["val_loss"]] == [(1, 0.25)]
    assert len(cloud.emu.pool.hosts) == 1 and host.destroyed
# one tick of an orchd process killed (-9) once its launch began, before the backend id is committed
_KILLED_BEFORE_RECORDING = """
import os, sys, time
from orchestrator import service

app = service.open_app({"ORCHD_HOME": sys.argv[1]})

def killed(*args, **kwargs):
    time.sleep(1.0)  # the launch's thread asks for offers meanwhile
    os.kill(os.getpid(), 9)

app.ticker._submitted = killed
app.ticker.tick(lock_timeout=5)
"""


def test_daemon_killed_before_it_recorded_its_launch_is_launched_again_at_once(cloud, tmp_path):
    """``kill -9`` of the orchd process after it committed an attempt's intent (with its launch
    lease, two minutes) and began the launch, before it recorded the backend id. The launch's
    lock file in this home names that intent and nobody holds it: the next tick takes the attempt
    for launched, its poll finds nothing rented, and the job is launched anew at once (before,
    the live lease of a dead launcher kept it waiting two minutes: a CI run timed out on it)."""
    from orchestrator.models import Attempt

    offers = "/api/v0/bundles/" if cloud.name == "vastai" else "/v2/catalog/gpus"
    cloud.emu.stall[offers] = 4.0
    app = cloud.app
    (job,) = service.submit(app, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")), start_now=False)
    p = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RECORDING, str(app.settings.home)], cwd=ROOT,
                       timeout=60)
    assert p.returncode == -9 and offers in cloud.emu.arrived
    with app.sessions() as s:
        ((bid, lease),) = s.query(Attempt.backend_id, Attempt.launch_lease_until).all()
    assert bid is None and lease > time.time() + 60, (bid, lease)  # its lease would hold it a while yet
    cloud.emu.stall.clear()
    time.sleep(4.5)  # the stalled call is answered (to nobody)
    assert not cloud.emu.pool.hosts
    (d,) = run(app, [job], timeout=50)
    assert_launched_again_once(d)
    (host,) = cloud.emu.pool.hosts.values()
    assert host.destroyed


# one tick of an orchd process killed (-9) once it committed an attempt's intent, before its launch began
_KILLED_BEFORE_LAUNCHING = """
import os, sys
from orchestrator import service
from orchestrator.backends.cloud import CloudBackend

def killed(self, req):
    os.kill(os.getpid(), 9)

CloudBackend.submit = killed
service.open_app({"ORCHD_HOME": sys.argv[1]}).ticker.tick(lock_timeout=5)
"""


def test_daemon_killed_after_committing_an_intent_before_its_launch_began_is_launched_at_once(cloud, tmp_path):
    """``kill -9`` right after the tick committed an attempt's intent and two-minute lease, before
    its launch thread existed. The tick took the launch's lock (its note the intent's token)
    before that commit, so the next tick sees a launch of this home that died, not a live one:
    the job is launched at once (it waited the lease out before)."""
    from orchestrator.models import Attempt

    app = cloud.app
    (job,) = service.submit(app, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")), start_now=False)
    p = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_LAUNCHING, str(app.settings.home)], cwd=ROOT,
                       timeout=60)
    assert p.returncode == -9
    with app.sessions() as s:
        ((bid, lease),) = s.query(Attempt.backend_id, Attempt.launch_lease_until).all()
    assert bid is None and lease > time.time() + 60, (bid, lease)  # its lease would hold it a while yet
    assert not cloud.emu.pool.hosts
    t0 = time.time()
    (d,) = run(app, [job], timeout=50)
    assert_launched_again_once(d)
    assert time.time() - t0 < 50
    (host,) = cloud.emu.pool.hosts.values()
    assert host.destroyed


def test_a_launch_whose_id_was_not_recorded_is_not_started_again_by_another_home(cloud, tmp_path, monkeypatch):
    """Home A commits an attempt's intent and starts its launch, then fails to record the backend
    id (a database error in that tick). Home B's ticks find an intent, no id and no instance yet
    (the provider is slow to answer A's offers): the attempt's live lease says A launches it, so
    B waits instead of launching it a second time; A's next tick records the id. One instance,
    one attempt, COMPLETED."""
    offers = "/api/v0/bundles/" if cloud.name == "vastai" else "/v2/catalog/gpus"
    a = cloud.app
    b = second_home(a, tmp_path)
    submitted, failed = a.ticker._submitted, []

    def fails_once(*args, **kwargs):
        if not failed:
            failed.append(1)
            raise RuntimeError("database went away while recording the backend id")
        return submitted(*args, **kwargs)

    monkeypatch.setattr(a.ticker, "_submitted", fails_once)
    cloud.emu.stall[offers] = 3.0
    (job,) = service.submit(a, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")))
    assert failed and service.job_detail(a, job)["attempts"][0]["backend_id"] is None
    for _ in range(4):  # A's launch waits for its offers meanwhile
        assert b.ticker.tick(lock_timeout=5).started == 0
        assert service.job_detail(b, job)["detail"] == "LAUNCHING in another orchd process"
        time.sleep(0.5)
    cloud.emu.stall.clear()
    (d,) = run(a, [job], timeout=120)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1, (d["attempts"], d["actions"])
    hosts = list(cloud.emu.pool.hosts.values())
    assert len(hosts) == 1 and hosts[0].destroyed, hosts  # B never launched it a second time
    assert [(m["step"], m["value"]) for m in d["metrics"]["val_loss"]] == [(1, 0.25)]
def test_a_launcher_waits_out_another_process_probing_its_lock(tmp_path):
    """``launch_locked`` (another orchd process asking whether a launch lives) takes the lock for
    an instant; a launcher starting in that instant waits it out instead of failing its launch as
    "another orchd process is launching". A lock held for real still refuses it."""
    import threading

    from orchestrator.backends.cloud import launch_lock, launch_locked

    path = tmp_path / "launching" / "orchd-1-a1"
    held, release = threading.Event(), threading.Event()

    def probe() -> None:  # a probe that lingers, as one descheduled mid-probe would
        with launch_lock(path):
            held.set()
            release.wait(5)

    t = threading.Thread(target=probe)
    t.start()
    assert held.wait(5)
    threading.Timer(0.2, release.set).start()
    with launch_lock(path, note="1.1.abc", wait=1.0) as mine:
        assert mine and launch_locked(path)
    t.join()
    assert path.read_text() == "1.1.abc" and not launch_locked(path)
    with launch_lock(path) as first:
        t0 = time.monotonic()
        with launch_lock(path, wait=0.3) as second:
            assert first and not second and time.monotonic() - t0 >= 0.3


def test_a_stale_lock_file_of_an_older_launch_does_not_outvote_another_homes_lease(cloud, tmp_path):
    """Home B once began launching an attempt and died before recording it; home A took the
    attempt over once B's lease lapsed and launches it now, under a lease of its own. B's lock
    file for that attempt is still there, free, naming B's old intent: B's ticks must read A's
    lease, not take A's launch (no instance listed yet) for abandoned and launch the job a second
    time. One attempt, one instance, COMPLETED."""
    offers = "/api/v0/bundles/" if cloud.name == "vastai" else "/v2/catalog/gpus"
    a = cloud.app
    b = second_home(a, tmp_path)
    cloud.emu.stall[offers] = 4.0
    (job,) = service.submit(a, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")))
    (att,) = service.job_detail(a, job)["attempts"]
    assert att["backend_id"]  # recorded by A, whose launch waits for its offers
    stale = b.backend(cloud.name).launch_dir / att["backend_id"]
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(f"{job}.1.0")  # B's own launch of it, long ago (its intent's token)
    for _ in range(4):
        b.ticker.tick(lock_timeout=5)
        d = service.job_detail(b, job)
        assert len(d["attempts"]) == 1 and d["detail"] == "LAUNCHING in another orchd process", d
        time.sleep(0.5)
    cloud.emu.stall.clear()
    (d,) = run(a, [job], timeout=60)
    assert d["state"] == "COMPLETED" and len(d["attempts"]) == 1, (d["attempts"], d["actions"])
    (host,) = cloud.emu.pool.hosts.values()
    assert host.destroyed


def test_a_launcher_on_another_host_killed_mid_launch_is_taken_over_once_its_lease_lapses(cloud, tmp_path):
    """``kill -9`` of home A's daemon while the instance it rented boots. Home B (another host on
    the same database) leaves the launch alone while A's lease holds, also once the instance
    answers SSH with nothing started; once the lease has lapsed (set in the past here, as two
    minutes would make it), B destroys that instance and launches the job anew: COMPLETED once,
    one value, nothing left billing."""
    a = cloud.reopen(boot_timeout=60, ssh_timeout=60)  # the lease decides here, not the launch timeout
    cloud.emu.boot_seconds = 3.0
    b = second_home(a, tmp_path)
    job, (first,) = submit_then_kill_the_daemon(  # while the instance boots: its lease stays
        a, write_spec(tmp_path, cloud.spec("echo step 1 val_loss=0.25")),
        lambda: list(cloud.emu.pool.hosts.values()) or None, "the daemon to rent an instance")
    answered = first.created + cloud.emu.boot_seconds
    while time.time() < answered + 4:  # booting, then up with nothing started: B waits on A's lease
        b.ticker.tick(lock_timeout=5)
        d = service.job_detail(b, job)
        assert len(d["attempts"]) == 1 and d["attempts"][0]["ended_at"] is None and not first.destroyed, d
        time.sleep(0.5)
    from sqlalchemy import update

    from orchestrator.models import Attempt

    with b.sessions.begin() as s:  # two minutes later: the lease has lapsed
        s.execute(update(Attempt).values(launch_lease_until=time.time() - 1))
    (d,) = run(b, [job], timeout=120)
    assert_launched_again_once(d)
    hosts = list(cloud.emu.pool.hosts.values())
    assert len(hosts) == 2 and all(h.destroyed for h in hosts)  # 0 left billing
def test_daemon_killed_before_it_rented_the_job_is_launched_again(cloud, tmp_path):
    """``kill -9`` of the daemon while its launch still waits for the provider's offers: nothing
    was rented, and the next orchd process finds no instance and nobody launching. That is a
    launch cut short, not a run lost: the job is launched anew, once (before, the attempt was
    taken for one whose instance vanished and the job ended NODE_FAIL). The relaunch spends
    none of ``retry.max_attempts``: the first run fails, and its retry still comes, to COMPLETED
    (before, "2 attempts used" after the relaunch and one run)."""
    offers = "/api/v0/bundles/" if cloud.name == "vastai" else "/v2/catalog/gpus"
    cloud.emu.stall[offers] = 4.0
    app = cloud.app
    ran = tmp_path / "ran"  # (the instances are processes on this machine: they share tmp_path)
    cmd = f"if [ -e {ran} ]; then echo step 1 val_loss=0.25; else touch {ran}; exit 3; fi"
    retry = "retry: {max_attempts: 2, backoff: 1s, on: ['exit:3']}\n"
    job, _ = submit_then_kill_the_daemon(  # while the provider has not answered: nothing rented
        app, write_spec(tmp_path, cloud.spec(cmd, retry)), lambda: offers in cloud.emu.arrived,
        "the daemon to ask for offers")
    cloud.emu.stall.clear()
    time.sleep(4.5)  # the stalled call is answered (to nobody)
    assert not cloud.emu.pool.hosts
    (d,) = run(app, [job], timeout=120)
    _, a2, a3 = assert_launched_again_once(d, attempts=3)
    assert a2["state"] == "FAILED" and a2["exit_code"] == 3 and a3["state"] == "COMPLETED", (a2, a3)
    hosts = list(cloud.emu.pool.hosts.values())
    assert len(hosts) == 2 and all(h.destroyed for h in hosts)  # one instance a run, 0 left billing
