"""Shared fixtures: a private ORCHD_HOME per test, an App on it, the orchd CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import service

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def private_xdg_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the config file of whoever runs the tests (~/.config/orchd/config.yaml)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "orchd-home"
    h.mkdir()
    return h


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return {**os.environ, "ORCHD_HOME": str(home), "ORCHD_TICK_SECONDS": "1"}


@pytest.fixture
def app(env: dict[str, str]) -> service.App:
    return service.open_app(env)


@pytest.fixture
def orchd(env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the orchd CLI (the installed entry point's module) in the test's ORCHD_HOME."""

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"orchd {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p

    return run


def wait_for(pred: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition") -> object:
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_spec(tmp: Path, text: str, name: str = "spec.yaml") -> Path:
    """A spec file in tmp whose workdir defaults to the repository root."""
    p = tmp / name
    if "workdir:" not in text and text.startswith("name:"):
        text += f"\nworkdir: {ROOT}\n"
    p.write_text(text)
    return p


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (PID 1 here may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def group_alive(pgid: int) -> bool:
    """True if a live (non-zombie) process is in process group ``pgid``."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


@pytest.fixture
def pg_database():
    """A function that makes a new, empty database on the test PostgreSQL
    (scripts/start-local-postgres.sh; its URL in ORCHD_TEST_PG_URL) and returns its URL; all are
    dropped afterwards. Skipped without one, unless ORCHD_REQUIRE_PG=1 (CI)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = os.environ.get("ORCHD_TEST_PG_URL")
    if not base:
        if os.environ.get("ORCHD_REQUIRE_PG") == "1":
            pytest.fail("no PostgreSQL: run scripts/start-local-postgres.sh (as root) and set ORCHD_TEST_PG_URL")
        pytest.skip("no PostgreSQL (scripts/start-local-postgres.sh starts one; set ORCHD_TEST_PG_URL)")
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"orchd_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        made.append(name)
        return make_url(base).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as c:
        for name in made:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def pg_url(pg_database) -> str:
    """A new, empty database on the test PostgreSQL (see pg_database)."""
    return pg_database()


@pytest.fixture
def smtp():
    """A real SMTP server on loopback (aiosmtpd) that records what it receives."""
    from tests.smtp_server import SMTPServer

    server = SMTPServer().start()
    yield server
    server.stop()
