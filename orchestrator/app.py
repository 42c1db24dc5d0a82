"""The ``App``: one orchd home's settings, database and backends, each opened on first use.

Everything is imported where it is first needed, so a command that only reads the database
(``orchd status``) loads neither the ORM, the backends, the notifier nor the ticker.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from orchestrator.config import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from orchestrator.backends.base import Backend
    from orchestrator.clusters import Config
    from orchestrator.tick import Ticker


@dataclass
class App:
    """Settings of one ``$ORCHD_HOME``; ``engine``, ``sessions``, ``config``, ``ticker`` and each
    ``backend(name)`` are made once, when first asked for."""

    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        from orchestrator.db import make_engine

        return make_engine(self.settings.db_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        from orchestrator.db import make_sessionmaker

        return make_sessionmaker(self.engine)

    def backend(self, name: str) -> Backend:
        from orchestrator.backends import get_backend

        cache = self.__dict__.setdefault("_backends", {})
        if name not in cache:
            cache[name] = backend = get_backend(name, self.settings)
            if hasattr(backend, "lease_writer"):  # a launch of a rented instance: told to every home on the database
                from orchestrator import leases

                backend.lease_writer = lambda label, until: leases.write(self.sessions, label, until)
        return cache[name]

    @cached_property
    def config(self) -> Config:
        from orchestrator.clusters import load_config

        return load_config(self.settings.config_path, self.settings.config_required)

    @cached_property
    def ticker(self) -> Ticker:
        from orchestrator.tick import Ticker

        return Ticker(self.settings, self.sessions, self.backend, self.config)

    def flush_alerts(self) -> int:
        """Send due alerts (see notify.flush_outbox); returns messages sent."""
        from orchestrator.notify import flush_outbox

        return flush_outbox(self.sessions, self.config.email, lock=lambda: self.ticker.lock("outbox", timeout=0),
                            channels=self.config.notify)


def open_app(environ: dict[str, str] | None = None) -> App:
    """The App of ``$ORCHD_HOME`` (from ``environ``, else the process's). Raises ConfigError."""
    return App(load_settings(environ))
