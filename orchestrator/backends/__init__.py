"""Backends: where attempts run. ``get_backend(name, settings)`` returns one by name."""

from __future__ import annotations

from orchestrator.backends.base import Backend
from orchestrator.config import Settings
from orchestrator.errors import BackendError


def get_backend(name: str, settings: Settings) -> Backend:
    """The backend called ``name``. Raises BackendError for one this build does not have."""
    if name == "local":
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(settings.jobs_dir)
    raise BackendError(f"backend {name!r} is not available yet (this build has: local)")
