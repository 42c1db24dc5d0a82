"""Cluster profiles: how to reach a SLURM cluster and what every job there needs.

They live in the config file (``$ORCHD_HOME/config.yaml`` or ``$ORCHD_CONFIG``) under
``clusters:`` and a spec picks one with ``cluster: NAME``. See README "SLURM clusters" for a
LUMI-style (AMD) and an NVIDIA example.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import ConfigError
from orchestrator.shellsafe import check_slurm_name

log = logging.getLogger("orchd.config")


class ClusterProfile(BaseModel):
    """One cluster. ``mode`` local: orchd runs where ``sbatch`` is; ssh: orchd reaches the
    login node ``host`` with paramiko (key auth, host key checked against ``known_hosts``).
    ``work_dir`` (on the cluster's shared filesystem, e.g. scratch) holds scripts, logs and
    each job's directory (``$ORCHD_JOB_DIR``, where checkpoints survive across attempts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["local", "ssh"] = "local"
    host: str | None = None
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    account: Annotated[str | None, AfterValidator(check_slurm_name)] = None
    partition: Annotated[str | None, AfterValidator(lambda v: check_slurm_name(v, allow_list=True))] = None
    gpus_per_node: int = Field(0, ge=0, le=64)
    cpus_per_task: int | None = Field(None, ge=1)
    vendor: Literal["amd", "nvidia", "none"] = "nvidia"
    modules: list[str] = []
    container: str | None = None  # a prefix such as "singularity exec --rocm image.sif"
    sbatch_extra: list[str] = []  # more "#SBATCH" options, e.g. "--exclusive"
    env: dict[str, str] = {}
    work_dir: str = "orchd"  # relative: under the login user's home
    slurm_conf: str | None = None  # SLURM_CONF for the commands orchd runs (local mode)
    requeue: bool = False  # let SLURM requeue on node failure / preemption (else orchd resubmits)
    usd_per_gpu_hour: float | None = Field(None, ge=0)  # converts GPU-hours to USD for budgets


class LocalCosts(BaseModel):
    """What an hour of the local machine costs (a rented box, a shared workstation), USD/hr."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    usd_per_hour: float = Field(0.0, ge=0)


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_usd: float | None = Field(None, gt=0)
    max_gpu_hours: float | None = Field(None, gt=0)


class Budgets(BaseModel):
    """Per-project and total limits; alerts at these fractions of a limit (1.0 also stops)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alerts_at: list[float] = [0.5, 0.8, 1.0]
    total: Limit | None = None
    projects: dict[str, Limit] = {}


class Email(BaseModel):
    """SMTP settings. The password comes from the environment variable ``password_env`` or the
    file ``password_file`` (mode 0600), read when a mail is sent: never from here, never stored."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    host: str
    port: int = 587
    security: Literal["starttls", "ssl", "none"] = "starttls"
    user: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    sender: str = Field("orchd@localhost", alias="from")
    to: list[str] = []
    on: list[Literal["failed", "success", "budget", "expectation", "idle", "digest"]] = [
        "failed", "budget", "expectation", "idle"]
    digest_after: int = Field(3, ge=2)  # this many alerts pending at once go out as one mail
    # the daily report ("digest" in on): local time of day it is mailed, covering what changed since the last
    digest_time: str = Field("08:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")


class Channels(BaseModel):
    """Where alerts go besides email: apprise URLs (https://github.com/caronc/apprise/wiki:
    ``slack://``, ``ntfy://``, ``json://`` webhooks, ``mailto://``, ...). A URL may name its secret
    as ``${VAR}`` (an environment variable read when sending, never stored or handed to jobs).
    ``on``: the alert kinds they get."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    urls: list[str] = []
    on: list[Literal["failed", "success", "budget", "expectation", "idle"]] = [
        "failed", "budget", "expectation", "idle"]

    def env_names(self) -> set[str]:
        """The environment variables the URLs name (``${VAR}``)."""
        return {m for u in self.urls for m in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", u)}


class CloudAccount(BaseModel):
    """What every rented-instance provider needs. The API key comes from the environment variable
    ``api_key_env``, read when the backend starts: never from here, never stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    api_key_env: str
    ssh_key: str = "~/.ssh/id_ed25519"  # its public half must be in the provider account
    ssh_user: str = "root"
    boot_timeout: float = Field(1200.0, gt=0)  # seconds for the provider to boot it (image pull), as dstack waits
    ssh_timeout: float = Field(300.0, gt=0)  # seconds for it to answer SSH once the provider says it runs
    max_offers_tried: int = Field(3, ge=1)
    max_parallel_launches: int = Field(8, ge=1)  # launches (rent, SSH, upload) running at once
    # a running attempt nobody can reach (no SSH, no exit code) for this long is ended NODE_FAIL
    # (BACKEND_LOST) and its instance destroyed: it would otherwise bill unobserved forever
    no_news_timeout: float = Field(900.0, gt=0)
    # orchd ends an attempt at started_at + time_limit + this, whatever the instance does (its own
    # `timeout` may never fire on an instance that restarted or hangs)
    time_limit_grace: float = Field(60.0, ge=0)
    # seconds a destroyed instance may still be listed (providers delete eventually) before orchd
    # calls the destroy failed and leaves it to the next reconcile
    destroy_timeout: float = Field(120.0, gt=0)


class VastAI(CloudAccount):
    """Vast.ai (API: https://docs.vast.ai/api)."""

    server_url: str = "https://console.vast.ai"
    api_key_env: str = "VAST_API_KEY"
    # seconds between two calls of an endpoint (search, create, show, list, destroy), shared by every
    # orchd process of this $ORCHD_HOME; defaults are Vast's documented thresholds (vastai.RATE_LIMITS)
    rate_limits: dict[Literal["search", "create", "show", "list", "destroy"], float] = {}


class RunPod(CloudAccount):
    """RunPod (REST API v2: https://docs.runpod.io/api-reference-v2); ``api_url`` is the base
    the ``/v2/...`` paths are appended to."""

    api_url: str = "https://api.runpod.io"
    api_key_env: str = "RUNPOD_API_KEY"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: dict[str, ClusterProfile] = {}
    local: LocalCosts = LocalCosts()
    budgets: Budgets = Budgets()
    email: Email | None = None
    notify: Channels | None = None
    vastai: VastAI | None = None
    runpod: RunPod | None = None
    # variables of orchd's environment that jobs get although orchd keeps them to itself
    # (ORCHD_* and the secrets named above are never handed to jobs otherwise)
    pass_env: list[str] = []

    def secret_env_names(self) -> set[str]:
        """Environment variables that hold this config's secrets (API keys, SMTP password)."""
        names = {c.api_key_env for c in (self.vastai, self.runpod) if c is not None}
        if self.email is not None and self.email.password_env:
            names.add(self.email.password_env)
        if self.notify is not None:
            names |= self.notify.env_names()
        return names


def load_config(path: Path, required: bool = False) -> Config:
    """Read the config file (a missing file is an empty config, unless ``required``: a file the
    user named with ``$ORCHD_CONFIG``). Raises ConfigError naming the file, line and key path
    (``config.yaml:12: email.on.0: ...``). Keys are read as names, so ``on:`` is the key "on"
    (not YAML 1.1's True). Secrets do not belong here: SSH uses key files, never passwords."""
    from orchestrator.specfile import format_errors, load_yaml  # specfile imports the spec, which is heavier

    if not path.exists():
        if required:
            raise ConfigError(f"{path}: no such config file (named by $ORCHD_CONFIG)")
        return Config()
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the config: {e}") from None
    if not text.strip():
        return Config()
    data, lines = load_yaml(text, where, ConfigError, "the config is a mapping of keys (clusters, email, ...)")
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, where, lines, unknown="unknown key (see README for the config "
                                                                  "file's keys)")) from None
    if config.email is not None and path.stat().st_mode & 0o077:
        log.warning("%s holds the SMTP settings and is readable by other users: chmod 600 %s", path, path)
    return config
