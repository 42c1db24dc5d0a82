"""Where orchd keeps its state and how often it ticks: the only reader of the environment.

Variables (all optional):
  ORCHD_HOME            state directory; default ``$XDG_DATA_HOME/orchd`` (``~/.local/share/orchd``)
  ORCHD_DB_URL          SQLAlchemy URL of the job database; default ``sqlite:///$ORCHD_HOME/orchd.db``
  ORCHD_TICK_SECONDS    daemon tick interval in seconds; default 5
  ORCHD_CONFIG          config file (cluster profiles, costs, budgets, email); default
                        ``$ORCHD_HOME/config.yaml`` if it exists, else
                        ``$XDG_CONFIG_HOME/orchd/config.yaml`` (``~/.config/orchd/config.yaml``)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError

DEFAULT_TICK_SECONDS = 5.0
# orchd's own variables a job may see; every other ORCHD_* (ORCHD_DB_URL may hold a password,
# ORCHD_SMTP_PASSWORD is one) stays with orchd, as do the provider keys
PUBLIC_ORCHD_VARS = frozenset({"ORCHD_HOME", "ORCHD_CONFIG", "ORCHD_TICK_SECONDS"})
PROVIDER_KEY_VARS = frozenset({"VAST_API_KEY", "RUNPOD_API_KEY"})


def job_environ(secret_names: Iterable[str] = (), passed: Iterable[str] = (),
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment jobs inherit from orchd (local processes, ``sbatch``): orchd's own minus
    its secrets: the provider API keys, ``secret_names`` (the config's ``api_key_env`` and
    ``password_env``) and every ``ORCHD_*`` but PUBLIC_ORCHD_VARS. ``passed`` (the config's
    ``pass_env``) names variables to keep anyway. The spec's ``env`` is added by the backend."""
    env = os.environ if environ is None else environ
    hidden = PROVIDER_KEY_VARS | set(secret_names)
    keep = set(passed)
    return {k: v for k, v in env.items()
            if k in keep or (k not in hidden and not (k.startswith("ORCHD_") and k not in PUBLIC_ORCHD_VARS))}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. ``home`` holds the database, job directories and the tick lock."""

    home: Path
    db_url: str
    tick_seconds: float
    config_path: Path
    config_required: bool = False  # named by $ORCHD_CONFIG: a missing file is an error

    @property
    def jobs_dir(self) -> Path:
        """Per-job directories (logs, exit codes, checkpoints of local jobs)."""
        return self.home / "jobs"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read the settings from ``environ`` (default ``os.environ``); creates ``home``.

    Raises ConfigError for a tick interval that is not a positive number.
    """
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    home = Path(env.get("ORCHD_HOME") or Path(xdg) / "orchd").expanduser().resolve()
    if not home.exists():  # orchd's state (database, logs, host keys) is its user's alone
        home.mkdir(parents=True, mode=0o700)
    db_url = env.get("ORCHD_DB_URL") or f"sqlite:///{home / 'orchd.db'}"
    raw_tick = env.get("ORCHD_TICK_SECONDS", str(DEFAULT_TICK_SECONDS))
    try:
        tick = float(raw_tick)
    except ValueError:
        raise ConfigError(f"ORCHD_TICK_SECONDS={raw_tick!r} is not a number of seconds") from None
    if tick <= 0:
        raise ConfigError(f"ORCHD_TICK_SECONDS={raw_tick!r} must be > 0")
    return Settings(home=home, db_url=db_url, tick_seconds=tick, config_path=config_places(env, home)[0],
                    config_required=bool(env.get("ORCHD_CONFIG")))


def config_places(environ: Mapping[str, str], home: Path) -> list[Path]:
    """Where the config file is looked for, the one in use first: ``$ORCHD_CONFIG`` alone when
    set; else ``$ORCHD_HOME/config.yaml`` and ``$XDG_CONFIG_HOME/orchd/config.yaml`` (XDG Base
    Directory spec; ``~/.config`` when unset), the first that exists (the first if none does)."""
    if environ.get("ORCHD_CONFIG"):
        return [Path(environ["ORCHD_CONFIG"]).expanduser()]
    xdg = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser()
    places = [home / "config.yaml", xdg / "orchd" / "config.yaml"]
    return sorted(places, key=lambda p: not p.exists())  # stable: ORCHD_HOME's wins when both exist


def smtp_password(env_var: str | None, file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The SMTP password from ``$env_var`` or ``file`` (which must not be readable by group or
    others). Raises ConfigError naming the variable or file, never the secret."""
    env = os.environ if environ is None else environ
    if env_var:
        if env_var not in env:
            raise ConfigError(f"email.password_env: ${env_var} is not set")
        return env[env_var]
    if file:
        path = Path(file).expanduser()
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(f"email.password_file: {path}: {e.strerror}") from None
        if mode & 0o077:
            raise ConfigError(f"email.password_file: {path} is readable by others (chmod 600 it)")
        return path.read_text().strip()
    return None


def api_key(env_var: str, environ: dict[str, str] | None = None) -> str:
    """A provider API key from ``$env_var``; raises ConfigError naming the variable, never the key."""
    env = os.environ if environ is None else environ
    if not env.get(env_var):
        raise ConfigError(f"${env_var} is not set (the provider API key)")
    return env[env_var]
