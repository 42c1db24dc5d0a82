"""The job spec: what a user writes in ``jobspecs/NAME.yaml``, validated with pydantic.

Every model forbids unknown keys. Durations are stored in seconds, conditions as the text the
user wrote (parsed again by the rules; parsing is checked here so a bad rule fails at submit).
See README.md "Job spec reference" for every key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.conditions import KEY_COUNTERS, NoProgress, metric_of, parse_condition
from orchestrator.durations import parse_duration
from orchestrator.shellsafe import check_env, check_slurm_name
from orchestrator.states import JobState

BACKENDS = ("local", "slurm", "runpod", "vastai")
# Metric names every spec records, whether listed or not: the rules need a step to work with.
DEFAULT_METRICS = ("val_loss", "train_loss")
STORED = {"stored": True}  # validation context for specs read back from the database
MAX_TIME_LIMIT = 366 * 86400.0  # seconds; SLURM's own limit is "INFINITE" or a number of minutes


def _check_env(v: dict[str, str]) -> dict[str, str]:
    for k, x in v.items():
        check_env(k, x)  # what the scripts will check again: refused here, at submit, with the line
    return v


def _no_nul(v: str | None) -> str | None:
    if v is not None and "\x00" in v:
        raise ValueError("a NUL character cannot be passed to a shell")
    return v


def _seconds(v: Any, info: ValidationInfo) -> float:
    # a stored spec holds plain seconds; a user's file must say its unit (see durations.py)
    if info.context == STORED and isinstance(v, int | float):
        return float(v)
    return parse_duration(v)


Seconds = Annotated[float, BeforeValidator(_seconds)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Strict):
    """What one attempt asks for. ``time_limit`` in seconds; exceeding it ends in TIMEOUT."""

    nodes: int = Field(1, ge=1, le=100_000)
    gpus_per_node: int = Field(0, ge=0, le=64)
    cpus_per_task: int | None = Field(None, ge=1, le=100_000)
    time_limit: Annotated[Seconds, Field(gt=0, le=MAX_TIME_LIMIT)] | None = None
    partition: Annotated[str | None, AfterValidator(lambda v: check_slurm_name(v, allow_list=True))] = None
    account: Annotated[str | None, AfterValidator(check_slurm_name)] = None
    gpu: list[str] | None = None  # acceptable GPU names (cloud), e.g. [RTX 4090, A100 SXM4]
    max_usd_per_hour: float | None = Field(None, gt=0, le=1e6)
    disk_gb: float = Field(20.0, gt=0, le=1e6)
    image: str = "pytorch/pytorch:latest"
    min_reliability: float | None = Field(None, ge=0, le=1)  # Vast.ai reliability score
    cloud_type: Literal["ALL", "SECURE", "COMMUNITY"] = "ALL"  # RunPod: secure cloud, community cloud or either
    total_steps: int | None = Field(None, ge=1)  # the run's steps, for progress and ETA when its log does not say

    @field_validator("gpu", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Override(Strict):
    """Keys a retry may change for the next attempt."""

    command: Annotated[str | None, AfterValidator(_no_nul)] = None
    env: Annotated[dict[str, str], AfterValidator(_check_env)] = {}
    resources: dict[str, Any] = {}

    @field_validator("resources")
    @classmethod
    def _known_resources(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - set(Resources.model_fields)
        if unknown:
            raise ValueError(f"unknown resource key(s) {sorted(unknown)}; known: {sorted(Resources.model_fields)}")
        return v


_STATE_NAMES = {s.value for s in JobState} - {"PENDING", "RUNNING", "COMPLETED"}


def _check_trigger(text: str) -> str:
    """A retry trigger: a SLURM end state, ``exit:N`` or ``log:TEXT`` (a substring of a line)."""
    if text in _STATE_NAMES:
        return text
    if m := re.fullmatch(r"exit:(\d+)", text):
        if int(m[1]) == 0 or int(m[1]) > 255:
            raise ValueError(f"{text!r}: exit codes to retry on are 1..255")
        return text
    if text.startswith("log:") and text[4:].strip():
        return text
    raise ValueError(f"{text!r} is not a retry trigger; use one of {sorted(_STATE_NAMES)}, 'exit:N' or 'log:TEXT'")


Trigger = Annotated[str, BeforeValidator(lambda v: _check_trigger(str(v)))]


class RetryOn(Strict):
    """A trigger with an override for the attempt it causes (``{when: 'log:NCCL error', override: ...}``)."""

    when: Trigger
    override: Override | None = None


class Retry(Strict):
    """Retry with exponential backoff: the k-th retry waits backoff * factor**(k-1), capped."""

    max_attempts: int = Field(1, ge=1, le=100)
    backoff: Seconds = 30.0
    factor: float = Field(2.0, ge=1.0)
    max_backoff: Seconds = 3600.0
    on: list[Annotated[RetryOn, BeforeValidator(lambda v: {"when": v} if isinstance(v, str) else v)]] = []
    # attempt number (2, 3, ...) -> changes for that attempt; as max_attempts, attempts count from 1 and a
    # launch orchd itself cut short (and launched anew) is not counted
    overrides: dict[int, Override] = {}

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry)."""
        return min(self.max_backoff, self.backoff * self.factor ** (retry_number - 1))


class MetricExpectation(Strict):
    """The first sample at or after ``at_step`` must be within ``tolerance`` of ``approx``."""

    at_step: int = Field(ge=0)
    approx: float
    tolerance: float = Field(gt=0)


class KeysExpectation(Strict):
    """``exactly`` these keys (order ignored), or ``at_most`` this many."""

    exactly: list[str] | None = None
    at_most: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> KeysExpectation:
        if (self.exactly is None) == (self.at_most is None):
            raise ValueError("give exactly one of 'exactly' (a list of keys) or 'at_most' (a count)")
        return self


def _keys_expectation(v: Any) -> Any:
    return {"exactly": v} if isinstance(v, list) else v


class Expect(Strict):
    """Expectations: ``missing_keys`` / ``unexpected_keys`` (a list = exactly these) and metrics by name."""

    missing_keys: Annotated[KeysExpectation, BeforeValidator(_keys_expectation)] | None = None
    unexpected_keys: Annotated[KeysExpectation, BeforeValidator(_keys_expectation)] | None = None
    metrics: dict[str, MetricExpectation] = {}

    @model_validator(mode="before")
    @classmethod
    def _metric_keys(cls, data: Any) -> Any:
        # Users write `expect: {val_loss: {...}}`; metric names go under `metrics`.
        if isinstance(data, dict):
            data = dict(data)
            metrics = {k: data.pop(k) for k in list(data) if k not in KEY_COUNTERS and k != "metrics"}
            data["metrics"] = {**data.get("metrics", {}), **metrics}
        return data


class Budget(Strict):
    """A job's own limit (a sweep's jobs each have it). At 100 % the job is cancelled."""

    max_usd: float | None = Field(None, gt=0)
    max_gpu_hours: float | None = Field(None, gt=0)


class Notify(Strict):
    """Who hears of this job and on what; defaults from the config file's ``email``."""

    email: list[str] = []
    on: list[Literal["failed", "success", "budget", "expectation", "idle", "digest"]] | None = None


class Shutdown(Strict):
    """When a rented instance is released. It is always destroyed when the job ends
    (``on_end``); ``idle`` (seconds): also end the job, CANCELLED with reason IDLE, when its log
    has not grown for that long."""

    on_end: bool = True
    idle: Seconds | None = Field(None, gt=0)

    @field_validator("on_end")
    @classmethod
    def _always_on_end(cls, v: bool) -> bool:
        if not v:
            raise ValueError("on_end: false (keeping an instance after its job ends) is not supported: orchd "
                             "destroys it when the job ends, so nothing bills unwatched; download what you need "
                             "with 'artifacts'")
        return v


class Monitor(Strict):
    """A user regex over log lines. With a group ``value`` it records metric ``name`` (and a
    group ``step`` if present); without, a line matching it counts as event ``name``."""

    name: str = Field(pattern=r"^[A-Za-z_][\w./-]*$")
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v.encode())
        except re.error as e:
            raise ValueError(f"regex does not compile: {e}") from None
        return v


def _check_condition(text: str) -> str:
    parse_condition(text)
    return text


def _check_success(text: str) -> str:
    if isinstance(parse_condition(text), NoProgress):
        raise ValueError("no_progress is a cancel_if condition, not a success criterion")
    return text


ConditionText = Annotated[str, AfterValidator(_check_condition)]
SuccessText = Annotated[str, AfterValidator(_check_success)]


class JobSpec(Strict):
    """One job as submitted (sweeps already expanded). See README for each key."""

    name: str = Field(min_length=1, max_length=200)
    backend: Literal["local", "slurm", "runpod", "vastai"] = "local"
    cluster: str | None = None  # a cluster profile of the config file (backend slurm)
    # what runs: a shell command, or (backend slurm) the user's own batch script, submitted unchanged
    command: Annotated[str | None, Field(min_length=1), AfterValidator(_no_nul)] = None
    sbatch: str | None = None  # path of a batch script (relative to the spec file); instead of command
    submitit: str | None = None  # set by `orchd watch --submitit`: the submitit folder of the watched job
    workdir: str = "."
    env: Annotated[dict[str, str], AfterValidator(_check_env)] = {}
    resources: Resources = Resources()
    metrics: list[str] = list(DEFAULT_METRICS)
    monitors: list[Monitor] = []
    expect: Expect = Expect()
    success: SuccessText | list[SuccessText] | None = None
    # metric -> the value to beat (a published or an earlier run's): reports give the improvement in %
    baseline: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = {}
    cancel_if: list[ConditionText] = []
    retry: Retry = Retry()
    sweep: dict[str, list[str | int | float]] = {}
    max_parallel: int | None = Field(None, ge=1, le=100_000)  # a sweep's jobs running at once (SLURM array %N)
    project: str | None = None
    budget: Budget | None = None
    notify: Notify = Notify()
    sync: list[str] = []  # paths under workdir to upload (cloud); empty: all of workdir
    sync_exclude: list[str] = [".git", ".venv", "__pycache__", "runs", "*.egg-info"]  # not uploaded (cloud)
    artifacts: list[str] = []  # remote paths (relative to the job dir) downloaded when the job ends
    shutdown: Shutdown = Shutdown()

    @field_validator("sync")
    @classmethod
    def _relative_paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"{p!r}: sync paths are relative to workdir and stay inside it")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for k, x in v.items()}
        return v

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z_][\w./-]*", name):
                raise ValueError(f"{name!r} is not a metric name (letters, digits, _ . / -)")
        return list(dict.fromkeys([*v, *DEFAULT_METRICS]))

    @model_validator(mode="after")
    def _command_or_script(self) -> JobSpec:
        if (self.command is None) == (self.sbatch is None):
            raise ValueError("give either 'command' (what to run) or 'sbatch' (your own batch script), not both"
                             if self.command else "missing 'command' (what to run) or 'sbatch' (a batch script)")
        if self.sbatch is not None and self.backend != "slurm":
            raise ValueError(f"'sbatch' submits your own batch script to SLURM: it needs backend slurm, "
                             f"not {self.backend}")
        return self

    @model_validator(mode="after")
    def _cluster_given(self) -> JobSpec:
        if self.backend == "slurm" and not self.cluster:
            raise ValueError("backend slurm needs 'cluster: NAME' (a profile under clusters: in the config file)")
        if self.backend in ("vastai", "runpod") and self.resources.nodes > 1:
            raise ValueError(f"backend {self.backend} rents one instance per attempt: resources.nodes must be 1 "
                             f"(got {self.resources.nodes}); use gpus_per_node for more GPUs")
        return self

    @model_validator(mode="after")
    def _metrics_known(self) -> JobSpec:
        known = set(self.metrics) | {m.name for m in self.monitors}
        wanted = {metric_of(parse_condition(t)) for t in self.conditions()} | set(self.expect.metrics)
        unknown = sorted(n for n in wanted - known if n)
        if unknown:
            raise ValueError(f"metric(s) {unknown} are used in rules but not listed under 'metrics' or 'monitors'")
        return self

    @model_validator(mode="after")
    def _forecast_has_a_target(self) -> JobSpec:
        from orchestrator.conditions import ForecastMisses, Threshold

        if any(isinstance(parse_condition(t), ForecastMisses) for t in self.success_conditions()):
            raise ValueError("'forecast misses success' belongs under cancel_if, not success")
        if any(isinstance(parse_condition(t), ForecastMisses) for t in self.cancel_if) and not any(
                isinstance(c := parse_condition(t), Threshold) and c.by_step for t in self.success_conditions()):
            raise ValueError("cancel_if 'forecast misses success' needs a success criterion with a step to forecast, "
                             "e.g. success: 'val_loss < 0.34 by step 270'")
        return self

    def conditions(self) -> list[str]:
        """Every rule text: success criteria and cancel_if."""
        return self.success_conditions() + list(self.cancel_if)

    def success_conditions(self) -> list[str]:
        return [self.success] if isinstance(self.success, str) else list(self.success or [])

    def with_override(self, override: Override | None) -> JobSpec:
        """This spec with a retry override applied (command, env merged, resources merged)."""
        if override is None:
            return self
        data = self.model_dump()
        if override.command:
            data["command"] = override.command
        data["env"] = {**data["env"], **override.env}
        data["resources"] = {**data["resources"], **override.resources}
        return JobSpec.model_validate(data, context=STORED)

    @classmethod
    def from_stored(cls, text: str) -> JobSpec:
        """A spec saved with ``model_dump_json`` (durations already in seconds). Cached (specs are
        frozen, and every tick reads every active job's spec) in two generations, turned by
        ``turn_spec_cache`` at each tick: a spec a whole tick did not read is dropped. An
        LRU of fixed size would miss every time once the active jobs outnumber it (a tick reads
        them in the same order), and a parse is ~33 µs, a cached spec ~8.5 KB."""
        spec = _specs_now.get(text)
        if spec is None:
            spec = _specs_before.get(text) or JobSpec.model_validate_json(text, context=STORED)
            if len(_specs_now) >= MAX_CACHED_SPECS:  # a process that never ticks (or one huge tick)
                turn_spec_cache()
            _specs_now[text] = spec
        return spec


MAX_CACHED_SPECS = 100_000  # per generation
_specs_now: dict[str, JobSpec] = {}
_specs_before: dict[str, JobSpec] = {}


def turn_spec_cache() -> None:
    """Start a new generation of the parsed-spec cache: specs not read since the last turn go
    at the next one."""
    global _specs_now, _specs_before
    _specs_before, _specs_now = _specs_now, {}
