"""The job database: alembic migrations keep existing rows; SQLite settings."""

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
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"
        assert c.execute(text("SELECT log_offset, gpus, gpu_hours FROM attempts")).one() == (42, 0, 0.0)
        assert c.execute(text("SELECT name FROM jobs")).scalar() == "old"
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


def test_the_status_read_path_names_real_tables_and_columns():
    """listing.py reads with lightweight table() clauses (no ORM import): each must name a table
    and columns that models.py defines, or `orchd status` fails on a real database."""
    from orchestrator import listing
    from orchestrator.models import Base

    for light in (listing.JOBS, listing.ATTEMPTS, listing.SAMPLES, listing.HEARTBEATS):
        real = Base.metadata.tables[light.name]
        assert {c.name for c in light.columns} <= {c.name for c in real.columns}, light.name
