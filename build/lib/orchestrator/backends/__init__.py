"""Backends: where attempts run. ``get_backend(name, settings)`` returns one by name."""

from __future__ import annotations

from orchestrator.backends.base import Backend
from orchestrator.config import Settings
from orchestrator.errors import BackendError, ConfigError


def backend_key(backend: str, cluster: str | None) -> str:
    """The name a job's backend is stored under: ``local``, ``slurm:<cluster>``."""
    return f"{backend}:{cluster}" if backend == "slurm" else backend


def get_backend(name: str, settings: Settings) -> Backend:
    """The backend called ``name`` (``local``, ``slurm:<cluster>``, ``vastai``, ``runpod``). Raises BackendError for
    one this build does not have, ConfigError for an unknown cluster."""
    from orchestrator.clusters import load_config

    if name == "local":
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(settings.jobs_dir, load_config(settings.config_path).local.usd_per_hour)
    if name.startswith("slurm:"):
        from orchestrator.backends.slurm import SlurmBackend

        cluster = name.split(":", 1)[1]
        clusters = load_config(settings.config_path).clusters
        if cluster not in clusters:
            raise ConfigError(f"cluster {cluster!r} is not in {settings.config_path} (known: {sorted(clusters)})")
        return SlurmBackend(cluster, clusters[cluster])
    if name == "vastai":
        from orchestrator.backends.vastai import VastBackend

        cfg = load_config(settings.config_path).vastai
        if cfg is None:
            raise ConfigError(f"backend vastai needs a 'vastai:' section in {settings.config_path}")
        return VastBackend(cfg, settings.home)
    if name == "runpod":
        from orchestrator.backends.runpod import RunPodBackend

        cfg = load_config(settings.config_path).runpod
        if cfg is None:
            raise ConfigError(f"backend runpod needs a 'runpod:' section in {settings.config_path}")
        return RunPodBackend(cfg, settings.home)
    raise BackendError(f"backend {name!r} does not exist (this build has: local, slurm, vastai, runpod)")
