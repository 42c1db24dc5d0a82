"""Cluster profiles: how to reach a SLURM cluster and what every job there needs.

They live in the config file (``$ORCHD_HOME/config.yaml`` or ``$ORCHD_CONFIG``) under
``clusters:`` and a spec picks one with ``cluster: NAME``. See README "SLURM clusters" for a
LUMI-style (AMD) and an NVIDIA example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import ConfigError


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
    account: str | None = None
    partition: str | None = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    vendor: Literal["amd", "nvidia", "none"] = "nvidia"
    modules: list[str] = []
    container: str | None = None  # a prefix such as "singularity exec --rocm image.sif"
    sbatch_extra: list[str] = []  # more "#SBATCH" options, e.g. "--exclusive"
    env: dict[str, str] = {}
    work_dir: str = "orchd"  # relative: under the login user's home
    slurm_conf: str | None = None  # SLURM_CONF for the commands orchd runs (local mode)
    requeue: bool = False  # let SLURM requeue on node failure / preemption (else orchd resubmits)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: dict[str, ClusterProfile] = {}


def load_config(path: Path) -> Config:
    """Read the config file (a missing file is an empty config). Raises ConfigError naming the
    file and key. Secrets do not belong here: SSH uses key files, never passwords."""
    if not path.exists():
        return Config()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return Config.model_validate(data)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{path}: {msgs}") from None
