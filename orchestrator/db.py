"""Engine and sessions for the job database; the schema is upgraded by alembic on first use.

SQLite runs in WAL mode (readers never block the tick) with a busy timeout, foreign keys on.
Writers that read-then-write (the tick, cancel) are serialised by the tick lock (tick.py);
submit only inserts new rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.orm import Session, sessionmaker

from orchestrator.revision import MIGRATIONS_DIR, head_revision

BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def _current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _recorded(engine: Engine) -> str | None:
    """The revision the database records (None for a new database), without alembic."""
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError:
        return None


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to alembic's head revision (no-op when it is there already).

    Two orchd processes starting on a new SQLite file (a daemon and a submit) would both try
    to create the tables: the upgrade runs under an exclusive lock file beside the database.
    """
    quick_head = head_revision()
    if quick_head is not None and _recorded(engine) == quick_head:
        return  # the usual case: alembic is not even imported
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(engine)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if _current(engine) == head:
        return
    db_file = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    lock = open(f"{db_file}.migrate.lock", "a") if db_file and db_file != ":memory:" else None  # noqa: SIM115
    try:
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(engine) != head:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    finally:
        if lock:
            lock.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with orchd's SQLite settings, schema upgraded to head."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    upgrade_schema(engine)
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        for suffix in ("", "-wal", "-shm"):  # jobs, costs and alerts are nobody else's business
            path = Path(f"{engine.url.database}{suffix}")
            if path.exists() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
                path.chmod(0o600)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    from sqlalchemy.orm import sessionmaker

    return sessionmaker(engine, expire_on_commit=False)


def state_json(state: dict[str, Any]) -> str:
    """The JSON text of an attempt's parser or rule state, as the tick stores it: compact, by
    orjson (0.7 µs against json.dumps's 7 µs for the two states of an attempt, 65 ms of a tick over
    10,000 jobs; bench/bench_tick.py). Read back with ``json.loads``, which also takes the texts
    json.dumps wrote before. JSON has no NaN or infinity and orjson writes them as null, so the
    states hold none (logparse keys a non-finite sample by its text; ``best`` keeps finite values).
    What orjson refuses and json.dumps takes (a lone surrogate, an integer past 64 bits) goes
    through json.dumps. Raises TypeError for a value JSON cannot hold, as json.dumps does."""
    try:
        return orjson.dumps(state).decode()
    except TypeError:  # (orjson.JSONEncodeError is one)
        return json.dumps(state)


ROWS_PER_INSERT = 256  # rows in one multi-row INSERT of insert_many (2,048 parameters at 8 columns)
PG_MAX_PARAMETERS = 65_535  # PostgreSQL's wire protocol: a 16-bit parameter count


def _driver_sql(s: Session, template: str, table: str, columns: tuple[str, ...], rows: int = 1) -> str:
    dialect = s.get_bind().dialect
    q = dialect.identifier_preparer.quote  # "offset" is a reserved word in PostgreSQL
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    marks = ", ".join([mark] * len(columns))
    return template.format(table=q(table), columns=", ".join(q(c) for c in columns),
                           values=", ".join([f"({marks})"] * rows),
                           sets=", ".join(f"{q(c)} = {mark}" for c in columns), mark=mark)


def insert_many(s: Session, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """INSERT ``rows`` (tuples in ``columns`` order) into ``table`` in the session's transaction,
    with DB-API ``executemany``: SQLAlchemy's per-row parameter processing costs ~2 µs a row
    (construct_params), most of a chatty log's tick. The rows go ROWS_PER_INSERT to a statement
    (``VALUES (...), (...), ...``), the rest one to a statement: SQLite's work per statement
    (reset, step) was 30% of 168,000 samples' insert (340 -> 250 ms). The SQL uses the dialect's
    own quoting and paramstyle (qmark for sqlite3, format for psycopg). A statement holds no more
    parameters than the database takes: SQLite's limit is read from the connection (32,766 since
    3.32, 999 before; https://www.sqlite.org/limits.html), PostgreSQL's is 65,535."""
    conn = s.connection()
    raw = conn.connection.driver_connection
    limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if isinstance(raw, sqlite3.Connection) \
        else PG_MAX_PARAMETERS
    k = max(1, min(ROWS_PER_INSERT, limit // len(columns)))
    whole = len(rows) - len(rows) % k
    if whole:
        conn.exec_driver_sql(_driver_sql(s, "INSERT INTO {table} ({columns}) VALUES {values}", table, columns, k),
                             [tuple(chain.from_iterable(rows[i:i + k])) for i in range(0, whole, k)])
    if whole < len(rows):
        conn.exec_driver_sql(_driver_sql(s, "INSERT INTO {table} ({columns}) VALUES {values}", table, columns),
                             rows[whole:])


def update_many(s: Session, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """UPDATE ``table`` SET ``columns`` WHERE id = ... for each of ``rows`` (the new values in
    ``columns`` order, then the row's id), with one DB-API ``executemany`` (see insert_many)."""
    s.connection().exec_driver_sql(_driver_sql(s, "UPDATE {table} SET {sets} WHERE id = {mark}", table, columns),
                                   rows)
