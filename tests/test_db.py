"""The job database: alembic migrations keep existing rows; SQLite settings."""

import re

from alembic import command
from sqlalchemy import create_engine, text

from orchestrator.db import _alembic_config, make_engine


def test_upgrade_from_first_schema_keeps_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    command.upgrade(_alembic_config(engine), "0001")  # a database made by the first release
    with engine.begin() as c:
        c.execute(text("INSERT INTO jobs (name, backend, state, reason, detail, spec_json, spec_path, created_at, "
                       "cost_usd) VALUES ('old', 'local', 'COMPLETED', 'SUCCESS', '', '{}', '', 1.0, 0)"))
        c.execute(text("INSERT INTO attempts (job_id, number, state, reason, overrides_json, submitted_at, "
                       "log_offset, parser_state, rule_state, cost_usd) VALUES (1, 1, 'COMPLETED', '', '{}', 1.0, "
                       "42, '{}', '{}', 0)"))
    engine = make_engine(url)  # upgrades to head on first use
    with engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0006"
        assert c.execute(text("SELECT log_offset, gpus, gpu_hours, launch_lease_until FROM attempts")).one() == \
            (42, 0, 0.0, None)
        assert c.execute(text("SELECT name FROM jobs")).scalar() == "old"
        assert c.execute(text("SELECT count(message_id) FROM alerts")).scalar() == 0
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_the_head_read_from_the_files_is_alembics():
    """make_engine skips alembic when the database is at the head read from migrations/versions:
    that reading must agree with alembic's own."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from orchestrator.db import MIGRATIONS_DIR, head_revision

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert head_revision() == ScriptDirectory.from_config(cfg).get_current_head() is not None


def test_the_status_and_costs_read_paths_name_real_tables_and_columns():
    """listing.py and costs.py read with plain SQL (no ORM import): each must name a table and
    columns that models.py defines, and the SQL must read no other column."""
    from orchestrator import costs, listing
    from orchestrator.models import Base

    for name, columns in listing.COLUMNS.items():
        assert set(columns) <= {c.name for c in Base.metadata.tables[name].columns}, name
    for name, columns in costs.USAGE_COLUMNS.items():
        assert set(columns) <= {c.name for c in Base.metadata.tables[name].columns}, name
    named = {f"{t[0]}.{c}" for t, cols in costs.USAGE_COLUMNS.items() for c in cols}
    assert set(re.findall(r"\b[ja]\.\w+", costs.USAGE_SQL)) <= named


def _fill_for_status(app, now: float) -> None:
    """Three jobs: an old COMPLETED one, a RUNNING one with samples (a NaN among them) and a
    success criterion by a step, a PENDING one."""
    from sqlalchemy import insert

    from orchestrator.models import Attempt, Job, MetricSample
    from orchestrator.spec import JobSpec

    spec = JobSpec(name="s", command="python train.py", success="val_loss < 0.1 by step 400").model_dump_json()
    with app.sessions.begin() as s:
        s.execute(insert(Job), [
            {"id": i, "name": f"j{i}", "backend": "local", "state": state, "reason": "R", "detail": "",
             "spec_json": spec, "spec_path": "", "created_at": now - 9000, "started_at": now - 8000 if i < 3 else None,
             "ended_at": now - 7200 * 24 if state == "COMPLETED" else None, "cost_usd": 0.5 * i}
            for i, state in ((1, "COMPLETED"), (2, "RUNNING"), (3, "PENDING"))])
        s.execute(insert(Attempt), [
            {"job_id": j, "number": 1, "state": st, "submitted_at": now - 8000, "started_at": now - 8000,
             "usd_per_hour": 2.0, "parser_state": '{"total": 500}'} for j, st in ((1, "COMPLETED"), (2, "RUNNING"))])
        s.execute(insert(MetricSample), [
            {"job_id": 2, "attempt": 1, "name": "val_loss", "step": step, "value": v, "at": now - 8000 + step * 10,
             "offset": step} for step, v in ((100, 0.9), (200, 0.5), (300, None), (310, 0.4))])


def test_status_reads_the_same_on_sqlite_and_postgresql(tmp_path, pg_url):
    """status's plain SQL (listing.py) gives the same rows on SQLite, where it runs on sqlite3
    alone, and on PostgreSQL through SQLAlchemy's pool: the newest-N limit, the last-day window,
    the latest value per metric (NaN kept), the attempts, the progress of the RUNNING one."""
    from orchestrator import listing, service

    got = {}
    for kind, url in (("sqlite", f"sqlite:///{tmp_path / 'o.db'}"), ("postgresql", pg_url)):
        app = service.open_app({"ORCHD_HOME": str(tmp_path / kind), "ORCHD_DB_URL": url})
        _fill_for_status(app, 1.7e9)
        with listing.open_reader(app) as r:
            assert (type(r.conn).__module__ == "sqlite3") == (kind == "sqlite")  # no SQLAlchemy on SQLite
            now = 1.7e9 + 60  # one clock for both (the window, elapsed and the ETA depend on it)
            got[kind] = (listing.job_summaries(r, now=now), listing.job_summaries(r, include_all=True, now=now),
                         listing.job_summaries(r, include_all=True, limit=2, now=now),
                         listing.count_jobs(r, include_all=True), listing.beat_age(r))
    sqlite, pg = got["sqlite"], got["postgresql"]
    assert [j["id"] for j in sqlite[1]] == [1, 2, 3] and [j["id"] for j in sqlite[2]] == [2, 3]
    assert [j["id"] for j in sqlite[0]] == [2, 3]  # the old COMPLETED job is out of the day's window
    running = sqlite[1][1]
    assert running["attempts"] == 1 and running["step"] == 310 and running["metrics"] == {"val_loss": 0.4}
    assert running["progress"]["total_steps"] == 500 and running["progress"]["sec_per_step"] == 10.0
    assert sqlite[3] == 3 and sqlite[4] is None
    assert repr(sqlite) == repr(pg)  # repr: NaN != NaN, but prints alike


def test_status_on_a_new_or_older_database_goes_through_the_upgrade(tmp_path):
    """The sqlite3-only read path is taken only at the head revision: a home without a database,
    and a database of the first release, are created or upgraded by SQLAlchemy first (a read
    with the old schema would fail), and list their jobs."""
    from orchestrator import listing, service

    fresh = service.open_app({"ORCHD_HOME": str(tmp_path / "fresh")})
    with listing.open_reader(fresh) as r:
        assert listing.job_summaries(r) == [] and type(r.conn).__module__ != "sqlite3"
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    command.upgrade(_alembic_config(engine), "0001")
    with engine.begin() as c:
        c.execute(text("INSERT INTO jobs (name, backend, state, reason, detail, spec_json, spec_path, created_at, "
                       "cost_usd) VALUES ('old', 'local', 'PENDING', 'SUBMITTED', '', '{}', '', 1.0, 0)"))
    old = service.open_app({"ORCHD_HOME": str(tmp_path / "old"), "ORCHD_DB_URL": url})
    with listing.open_reader(old) as r:
        assert [j["name"] for j in listing.job_summaries(r)] == ["old"]
    with listing.open_reader(service.open_app({"ORCHD_HOME": str(tmp_path / "old"), "ORCHD_DB_URL": url})) as r:
        assert type(r.conn).__module__ == "sqlite3"  # upgraded now: the quick path


def test_bulk_inserts_keep_every_row_in_order_on_sqlite_and_postgresql(tmp_path, pg_url):
    """db.insert_many, the tick's path for metric samples: whole multi-row statements and the rest
    one row at a time, on both databases: every row once, in order, NULLs kept."""
    from sqlalchemy import select

    from orchestrator import logread, service
    from orchestrator.db import ROWS_PER_INSERT
    from orchestrator.models import Job, MetricSample

    k = ROWS_PER_INSERT
    for url in (f"sqlite:///{tmp_path / 'o.db'}", pg_url):
        app = service.open_app({"ORCHD_HOME": str(tmp_path / url[:6]), "ORCHD_DB_URL": url})
        with app.sessions.begin() as s:
            s.add(Job(id=1, name="j", backend="local", state="RUNNING", reason="R", detail="", spec_json="{}",
                      created_at=0.0))
        sent = []
        for n in (0, 1, k - 1, k, k + 1, 2 * k + 7):
            rows = [(1, 1, f"m{i % 3}", len(sent) + i, None if i % 5 else 0.5, None if i % 7 == 0 else i / 3,
                     10 * (len(sent) + i), 1.5) for i in range(n)]
            with app.sessions.begin() as s:
                logread.insert_samples(s, rows)
            sent += rows
        with app.sessions() as s:
            got = [(r.job_id, r.attempt, r.name, r.step, r.epoch, r.value, r.offset, r.at)
                   for r in s.scalars(select(MetricSample).order_by(MetricSample.id))]
        assert got == sent and len(sent) == 5 * k + 8, url


def test_state_json_round_trips_what_the_tick_stores_and_what_orjson_refuses():
    """db.state_json: compact JSON that json.loads reads back; a lone surrogate or a 65-bit
    integer (which orjson refuses) through json.dumps; a set, which no JSON holds, a TypeError."""
    import json

    import pytest

    from orchestrator.db import state_json

    state = {"step": 7, "epoch": 1.5, "last": {"val_loss": (7, 1.5, "nan")}, "tail": (64, "ab"), "pending": None}
    text = state_json(state)
    assert " " not in text and json.loads(text) == json.loads(json.dumps(state))
    for odd in ({"keys": ["a\ud800b"]}, {"step": 2 ** 70}):
        assert json.loads(state_json(odd)) == odd
    with pytest.raises(TypeError):
        state_json({"checked": {"val_loss"}})


def test_bulk_inserts_stay_within_sqlites_parameter_limit(tmp_path):
    """An SQLite built with a lower limit of parameters per statement (999 before 3.32) still takes
    a tick's samples: insert_many sizes its multi-row statements to the connection's limit."""
    import sqlite3

    from sqlalchemy import func, select

    from orchestrator import logread, service
    from orchestrator.models import Job, MetricSample

    app = service.open_app({"ORCHD_HOME": str(tmp_path)})
    with app.sessions.begin() as s:
        s.add(Job(id=1, name="j", backend="local", state="RUNNING", reason="R", detail="", spec_json="{}",
                  created_at=0.0))
    with app.sessions.begin() as s:
        raw = s.connection().connection.driver_connection
        raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)  # 12 rows of 8 columns a statement
        logread.insert_samples(s, [(1, 1, "val_loss", i, None, i / 7, i, 1.5) for i in range(600)])
        raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(MetricSample)) == 600
