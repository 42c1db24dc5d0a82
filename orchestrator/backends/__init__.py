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
    from orchestrator.config import job_environ

    config = load_config(settings.config_path, settings.config_required)
    base_env = job_environ(config.secret_env_names(), config.pass_env)  # what jobs inherit: no secrets
    if name == "local":
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(settings.jobs_dir, config.local.usd_per_hour, base_env)
    if name.startswith("slurm:"):
        from orchestrator.backends.shell import LocalShell
        from orchestrator.backends.slurm import SlurmBackend

        cluster = name.split(":", 1)[1]
        if cluster not in config.clusters:
            missing = "" if settings.config_path.exists() else " (that file does not exist)"
            raise ConfigError(f"cluster {cluster!r} is not in {settings.config_path}{missing} "
                              f"(known: {sorted(config.clusters)})")
        profile = config.clusters[cluster]
        return SlurmBackend(cluster, profile, None if profile.mode == "ssh" else LocalShell(base_env))
    if name == "vastai":
        try:
            from orchestrator.backends.vastai import VastBackend
        except ModuleNotFoundError as e:
            raise ConfigError(f"backend vastai needs the cloud extra: pip install 'orchd[cloud]' ({e.name} is "
                              "missing)") from None

        if config.vastai is None:
            raise ConfigError(f"backend vastai needs a 'vastai:' section in {settings.config_path}")
        return VastBackend(config.vastai, settings.home)
    if name == "runpod":
        try:
            from orchestrator.backends.runpod import RunPodBackend
        except ModuleNotFoundError as e:
            raise ConfigError(f"backend runpod needs the cloud extra: pip install 'orchd[cloud]' ({e.name} is "
                              "missing)") from None

        if config.runpod is None:
            raise ConfigError(f"backend runpod needs a 'runpod:' section in {settings.config_path}")
        return RunPodBackend(config.runpod, settings.home)
    raise BackendError(f"backend {name!r} does not exist (this build has: local, slurm, vastai, runpod)")
