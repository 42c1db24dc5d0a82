"""The small condition language of ``success:`` and ``cancel_if:`` in a job spec.

Forms (``OP`` is one of ``< <= > >= == !=``; ``DUR`` a duration such as ``20m``)::

    val_loss < 0.34                 a metric sample satisfies the comparison
    val_loss < 0.34 by step 270     ... at a step <= 270 (success: missed once a later step is seen)
    val_loss > 2 after step 100     ... at a step >= 100
    val_loss is nan                 a NaN or infinite value of the metric was logged
    train_loss > 3x best            divergence: a value above 3 x the lowest value so far
    missing_keys > 2                the checkpoint report lists more than 2 missing keys
    unexpected_keys >= 1            same for unexpected keys
    no_progress 20m                 the log has not grown for 20 minutes while RUNNING
    forecast misses success         (cancel_if) the learning-curve forecast says the success
                                    criterion's "by step N" will be missed (forecast.py), from
                                    at least 5 samples; "... after 8 samples" asks for more

``parse_condition`` turns the text into one of the dataclasses below or raises ValueError.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.durations import parse_duration

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
KEY_COUNTERS = ("missing_keys", "unexpected_keys")

_NAME = r"(?P<name>[A-Za-z_][\w./-]*)"
_OP = r"(?P<op><=|>=|==|!=|<|>)"
_NUM = r"(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_THRESHOLD = re.compile(rf"{_NAME}\s*{_OP}\s*{_NUM}(?:\s+(?P<when>by|after)\s+step\s+(?P<step>\d+))?")
_NAN = re.compile(rf"{_NAME}\s+is\s+(?:nan|not\s+finite)")
_DIVERGE = re.compile(rf"{_NAME}\s*>\s*(?P<factor>\d+(?:\.\d+)?)\s*x\s*best")
_NO_PROGRESS = re.compile(r"no_progress\s+(?P<dur>.+)")
_FORECAST = re.compile(r"forecast\s+misses\s+success(?:\s+after\s+(?P<n>\d+)\s+samples?)?")


@dataclass(frozen=True)
class Threshold:
    """``metric OP value`` optionally limited to steps <= by_step or >= after_step."""

    metric: str
    op: str
    value: float
    by_step: int | None = None
    after_step: int | None = None

    def holds(self, value: float, step: int | None) -> bool:
        if self.after_step is not None and (step is None or step < self.after_step):
            return False
        if self.by_step is not None and step is not None and step > self.by_step:
            return False
        return OPS[self.op](value, self.value)


@dataclass(frozen=True)
class IsNaN:
    metric: str


@dataclass(frozen=True)
class Diverges:
    metric: str
    factor: float


@dataclass(frozen=True)
class KeyCount:
    """``missing_keys|unexpected_keys OP n`` over the latest checkpoint-loading report."""

    kind: str  # "missing" | "unexpected"
    op: str
    count: int

    def holds(self, n: int) -> bool:
        return OPS[self.op](n, self.count)


@dataclass(frozen=True)
class NoProgress:
    seconds: float


@dataclass(frozen=True)
class ForecastMisses:
    """The forecast of the success criterion is "will miss", from ``min_samples`` samples or more."""

    min_samples: int = 5


Condition = Threshold | IsNaN | Diverges | KeyCount | NoProgress | ForecastMisses


def parse_condition(text: str) -> Condition:
    """Parse one condition; raises ValueError that quotes the text and shows the forms."""
    return _parse(" ".join(str(text).split()), str(text))


@functools.lru_cache(maxsize=4096)
def _parse(s: str, text: str) -> Condition:
    """Cached (conditions are frozen): every tick evaluates each running job's rules again."""
    if m := _NO_PROGRESS.fullmatch(s):
        return NoProgress(parse_duration(m["dur"]))
    if m := _FORECAST.fullmatch(s):
        return ForecastMisses(max(5, int(m["n"] or 5)))
    if m := _NAN.fullmatch(s):
        return IsNaN(m["name"])
    if m := _DIVERGE.fullmatch(s):
        return Diverges(m["name"], float(m["factor"]))
    if m := _THRESHOLD.fullmatch(s):
        name, op, num = m["name"], m["op"], m["num"]
        if name in KEY_COUNTERS:
            if m["when"] or not num.lstrip("+").isdigit():
                raise ValueError(f"{text!r}: {name} compares with a whole number, e.g. '{name} > 2'")
            return KeyCount(name.split("_")[0], op, int(num))
        step = int(m["step"]) if m["step"] else None
        return Threshold(name, op, float(num), by_step=step if m["when"] == "by" else None,
                         after_step=step if m["when"] == "after" else None)
    raise ValueError(
        f"{text!r} is not a condition; forms: 'val_loss < 0.34 by step 270', 'val_loss is nan', "
        "'train_loss > 3x best', 'missing_keys > 2', 'no_progress 20m', 'forecast misses success'")


def metric_of(cond: Condition) -> str | None:
    """The metric a condition reads, or None for key counts and no_progress."""
    return getattr(cond, "metric", None)
