"""The schema's head revision, read from ``migrations/versions`` without SQLAlchemy or alembic:
every command checks it, and ``orchd status`` must not pay their imports (~0.2 s)."""

from __future__ import annotations

import re
from pathlib import Path

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent


def head_revision() -> str | None:
    """The head revision of migrations/versions, read from the files (``revision = '0004'``, the
    one no other file's ``down_revision`` names); None when that is not one revision (then
    alembic decides). Reading it this way spares every command alembic's ~0.1 s import."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        source = path.read_text()
        rev = re.search(r"^revision\s*=\s*['\"]([^'\"]+)['\"]", source, re.M)
        down = re.search(r"^down_revision\s*=\s*['\"]([^'\"]+)['\"]", source, re.M)
        if rev:
            revisions.add(rev.group(1))
        if down:
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None
