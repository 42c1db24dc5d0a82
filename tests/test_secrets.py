"""Secrets stay home and specs cannot inject (issue #10): the one rendering helper under hostile
strings (checked by bash itself, and run), jobs' environments without orchd's secrets, uploads
without secret-bearing files, private file modes, no terminal escapes from user strings."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator import service
from orchestrator.backends.base import SubmitRequest
from orchestrator.backends.slurm import SlurmBackend
from orchestrator.clusters import ClusterProfile
from orchestrator.errors import BackendError, SpecError
from orchestrator.shellsafe import UnsafeValue, comment_line, export_line, printable, sbatch_line
from orchestrator.spec import JobSpec
from orchestrator.uploads import plan
from tests.conftest import wait_for, write_spec

HOSTILE = [
    "plain", "", "two words", "new\nline", "$(touch {p}/dollar)", "`touch {p}/backtick`", "it's", 'say "hi"',
    "#SBATCH --uid=0", "\n#SBATCH --chdir=/\ntouch {p}/newline", "; touch {p}/semicolon", "a\\b", "tab\there",
    "$HOME ${{PATH}} $$", "*", "~root", "-n", "é ü 中文 🙂", "\x1b[2J\x1b[31mred", "x" * 20000,
    "' ; touch {p}/quote ; '",
]
SECRETS = {"VAST_API_KEY": "vast-secret-7f3a", "RUNPOD_API_KEY": "runpod-secret-91bc",
           "ORCHD_SMTP_PASSWORD": "smtp-secret-55d0", "LAB_SMTP_PW": "smtp-secret-named-by-config"}


def test_hostile_values_round_trip_through_bash_and_inject_nothing(tmp_path):
    values = {f"V{i}": v.format(p=tmp_path) for i, v in enumerate(HOSTILE)}
    script = "\n".join([comment_line(v) for v in values.values()] + [export_line(k, v) for k, v in values.items()]
                       + ['python3 -c "import json, os; print(json.dumps({k: os.environ[k] for k in os.environ '
                          'if k.startswith(\'V\') and k[1:].isdigit()}))"'])
    (tmp_path / "s.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0
    p = subprocess.run(["bash", str(tmp_path / "s.sh")], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert json.loads(p.stdout) == values
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.sh"]  # no file made by an injected command
    for bad in ("A=B", "1X", "a-b", "", "X\nY", "$(x)"):
        with pytest.raises(UnsafeValue):
            export_line(bad, "v")
    with pytest.raises(UnsafeValue):
        export_line("OK", "nul\x00")
    for bad in ("debug\n#SBATCH --uid=0", "a b", "$(x)", "", "p;q"):
        with pytest.raises(UnsafeValue):
            sbatch_line("partition", bad, allow_list=True)
    assert sbatch_line("partition", "small-g,dev-g", allow_list=True) == "#SBATCH --partition=small-g,dev-g"


def test_sbatch_script_keeps_hostile_spec_values_as_data(tmp_path):
    env = {f"V{i}": v.format(p=tmp_path) for i, v in enumerate(HOSTILE)}
    spec = JobSpec(name="n\n#SBATCH --uid=0\ntouch x", command=f"echo hi; $(touch {tmp_path}/cmd)",
                   env=env, workdir=str(tmp_path))
    backend = SlurmBackend("lab", ClusterProfile(partition="debug", account="proj_1", work_dir=str(tmp_path)))
    script = backend.render_script([SubmitRequest(1, 1, spec, tmp_path, token="1.1.ab")], str(tmp_path / "o.log"))
    sbatch = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert not any("uid" in ln or "chdir" in ln for ln in sbatch), sbatch
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    # everything before srun, for real: the exports must give back each value exactly
    head = (script[:script.index("first=$(scontrol")]
            + 'python3 -c "import os, json; print(json.dumps(dict(os.environ)))"\n')
    (tmp_path / "head.sh").write_text(head)
    got = json.loads(subprocess.run(["bash", str(tmp_path / "head.sh")], capture_output=True, text=True).stdout)
    assert {k: got[k] for k in env} == env and got["ORCHD_COMMAND"] == spec.command
    assert not [x for x in tmp_path.iterdir() if x.name not in ("job.sh", "head.sh")]
    for field in ("partition", "account"):
        with pytest.raises(ValueError, match="not a SLURM name"):
            JobSpec(name="x", command="x", resources={field: "debug\n#SBATCH --uid=0"})


def test_hostile_partition_and_env_name_refused_at_submit_with_the_line(app, tmp_path):
    for line, key in (('resources: {partition: "debug\\n#SBATCH --uid=0"}', "resources.partition"),
                      ('env: {"A;touch x": "1"}', "env")):
        s = write_spec(tmp_path, f"name: bad\ncommand: hostname\n{line}\n")
        with pytest.raises(SpecError, match=rf"spec.yaml:3: {key}"):
            service.submit(app, s)


@pytest.fixture
def secret_env(monkeypatch, home):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    (home / "config.yaml").write_text(yaml.safe_dump({"email": {"host": "127.0.0.1", "port": 1, "security": "none",
                                                                "password_env": "LAB_SMTP_PW", "to": ["a@b"]}}))
    return service.open_app({"ORCHD_HOME": str(home)})


def _grep_secrets(*blobs: bytes) -> list[str]:
    return [k for k, v in SECRETS.items() for b in blobs if v.encode() in b]


def test_local_job_environment_has_no_secrets_and_files_are_private(secret_env, home, tmp_path):
    app = secret_env
    spec = write_spec(tmp_path, "name: env-dump\ncommand: env\nenv: {MINE: kept}\n")
    [job] = service.submit(app, spec)

    def done():
        app.ticker.tick(lock_timeout=5)
        return service.job_state(app, job).terminal

    wait_for(done, 30, what="the env job")
    log = home / "jobs" / str(job) / "a1" / "output.log"
    text = log.read_bytes()
    assert b"MINE=kept" in text and b"ORCHD_JOB_ID=" in text
    assert _grep_secrets(text) == []
    assert _grep_secrets((home / "orchd.db").read_bytes()) == []
    with sqlite3.connect(home / "orchd.db") as c:
        dump = "\n".join(c.iterdump()).encode()
    assert _grep_secrets(dump) == []
    fresh = service.open_app({"ORCHD_HOME": str(tmp_path / "new-home")}).settings.home
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "orchd.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_uploads_keep_secret_bearing_files_and_orchd_home_at_home(tmp_path):
    work = tmp_path / "work"
    for rel in ("train.py", "pkg/model.py", ".ssh/id_ed25519", ".env", ".env.local", "certs/server.pem", "tls.key",
                "id_rsa", ".netrc", ".aws/credentials", ".git-credentials", "state/orchd.db", "state/config.yaml",
                "data/big.bin", "data/small.csv"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(b"x" * (3000 if rel == "data/big.bin" else 10))
    spec = JobSpec(name="u", command="x", workdir=str(work))
    p = plan(spec, work / "state", max_file_bytes=1000)
    assert sorted(rel for rel, _ in p.files) == ["data/small.csv", "pkg/model.py", "train.py"]
    kept = dict(p.kept)
    assert set(kept) >= {".ssh", ".env", ".env.local", "certs/server.pem", "tls.key", "id_rsa", ".netrc", ".aws",
                         ".git-credentials", "state", "data/big.bin"}
    assert "ORCHD_HOME" in kept["state"] and "over" in kept["data/big.bin"]
    named = plan(JobSpec(name="u", command="x", workdir=str(work), sync=["train.py", "data/big.bin", ".ssh"]),
                 work / "state", max_file_bytes=1000)
    assert sorted(rel for rel, _ in named.files) == ["data/big.bin", "train.py"]  # named: sent; secrets: never


def test_dry_run_shows_script_and_upload_and_starts_nothing(home, env, orchd, tmp_path):
    (tmp_path / "work" / ".ssh").mkdir(parents=True)
    (tmp_path / "work" / ".ssh" / "id_ed25519").write_text("k")
    (tmp_path / "work" / "train.py").write_text("print(1)")
    (home / "config.yaml").write_text(yaml.safe_dump({"vastai": {"server_url": "http://127.0.0.1:9"}}))
    spec = tmp_path / "c.yaml"
    spec.write_text(f"name: c\nbackend: vastai\ncommand: python train.py\nworkdir: {tmp_path / 'work'}\n"
                    "resources: {gpus_per_node: 1, max_usd_per_hour: 0.5, time_limit: 2h}\n")
    env["VAST_API_KEY"] = "k"
    p = orchd("submit", str(spec), "--dry-run")
    assert "upload: 1 file(s)" in p.stdout and "kept home: .ssh" in p.stdout and "at most $1.00" in p.stdout
    assert not (home / "orchd.db").exists()


def test_status_prints_no_terminal_escapes_or_markup(app, orchd, tmp_path):
    s = write_spec(tmp_path, 'name: "\\e[2J\\e[31mowned [bold]x[/bold] lr_sweep[/]"\ncommand: "true"\n')
    service.submit(app, s, start_now=False)
    out = orchd("status").stdout + orchd("show", "1").stdout
    assert "\x1b" not in out and "[bold]x[/bold]" in out and "lr_sweep[/]" in out
    assert printable("a\x1b[2Jb\x07c\nd") == "a?b?c\nd"


def test_scrubbed_environment_reaches_sbatch(monkeypatch, tmp_path):
    from orchestrator.backends.shell import LocalShell
    from orchestrator.config import job_environ

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ORCHD_DB_URL", "postgresql://u:dbpass@h/db")
    base = job_environ({"LAB_SMTP_PW"}, passed=[])
    assert not {*SECRETS, "ORCHD_DB_URL"} & set(base) and base["PATH"] == os.environ["PATH"]
    code, out, _ = LocalShell(base).run(["env"])
    assert code == 0 and _grep_secrets(out.encode()) == [] and "dbpass" not in out
    assert "RUNPOD_API_KEY" in job_environ(passed=["RUNPOD_API_KEY"])  # the config's pass_env


def test_cloud_start_command_refuses_what_cannot_be_quoted():
    from orchestrator.backends import cloud

    class Fake(cloud.CloudBackend):  # only _start_command's rendering is exercised
        name = "fake"

        def __init__(self):
            self.sent: list[str] = []

        def _exec(self, iid, cmd):
            self.sent.append(cmd)
            return 0, ""

        find_offers = create = show = list_instances = destroy_call = None

    f = Fake()
    spec = JobSpec(name="x", command="echo $(id)", env={"A": "'; touch /tmp/pwned; '"})
    f._start_command("i", SubmitRequest(1, 1, spec, Path("/tmp")), "/run")
    assert subprocess.run(["bash", "-n", "-c", f.sent[0]]).returncode == 0
    bad = spec.model_copy(update={"env": {"A;B": "1"}})
    with pytest.raises(BackendError, match="refusing"):
        f._start_command("i", SubmitRequest(1, 1, bad, Path("/tmp")), "/run")
