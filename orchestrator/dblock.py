"""Locks that serialise orchd's work among every process, on every host, that shares one job
database: the tick (and cancel, reconcile) under ``"tick"``, the mail outbox under ``"outbox"``.

- PostgreSQL: a session-level advisory lock (PostgreSQL docs, "Advisory Locks"), held on one
  dedicated connection for the whole critical section: ``pg_try_advisory_lock`` survives the
  commits a tick makes per job, and a crashed holder's lock goes with its connection.
- SQLite: an exclusive ``flock`` on a file beside the database file (``orchd.db.tick.lock``),
  so two ``ORCHD_HOME``s pointing at one database file are serialised too. The kernel drops it
  when its holder dies, even by ``kill -9``.
- Any other database: the same ``flock`` in ``fallback_dir`` (one host only).
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text

from orchestrator.errors import TickBusy

POLL_SECONDS = 0.05


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (advisory lock keys are bigint)."""
    return int.from_bytes(hashlib.sha256(f"orchd:{name}".encode()).digest()[:8], "big", signed=True)


def lock_file(engine: Engine, name: str, fallback_dir: Path) -> Path:
    """The file whose ``flock`` stands for lock ``name`` on a non-PostgreSQL database."""
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if db and db != ":memory:" and not db.startswith("file:"):
        return Path(f"{db}.{name}.lock")
    return fallback_dir / f"{name}.lock"


@contextmanager
def db_lock(engine: Engine, name: str, timeout: float | None, fallback_dir: Path) -> Iterator[None]:
    """Hold lock ``name`` for the database of ``engine``. ``timeout`` seconds to wait for it (0:
    try once; None: forever). Raises TickBusy when another holder keeps it past ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if engine.url.get_backend_name() == "postgresql":
        with _pg_lock(engine, name, deadline):
            yield
        return
    path = lock_file(engine, name, fallback_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TickBusy(f"another orchd process holds the {name} lock ({path})") from None
                time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _pg_lock(engine: Engine, name: str, deadline: float | None) -> Iterator[None]:
    key = lock_key(name)
    conn = engine.connect()
    try:
        while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            conn.rollback()  # no transaction left open while we wait
            if deadline is not None and time.monotonic() >= deadline:
                raise TickBusy(f"another orchd process holds the {name} lock (PostgreSQL advisory lock {key})")
            time.sleep(POLL_SECONDS)
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
            except Exception:  # noqa: BLE001 - a connection we cannot unlock must never go back to the pool
                conn.invalidate()
    finally:
        conn.close()
