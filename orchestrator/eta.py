"""How far along a running attempt is, how fast it goes, when it will be done and what that
costs: the arithmetic a researcher does by hand from "step 43/311", ~45 s a step and ~20 min
per validation every 25 steps.

Input: the attempt's metric samples as (time seen, step, name), in the order recorded, where
"time seen" is when orchd read the line (the tick's time: a tick that reads many steps gives
them one time, so rates are measured between ticks, not between lines). A sample whose name
starts with ``val`` marks a validation at its step.

The model (pure arithmetic, no fit):
- training seconds per step: ΣΔt / ΣΔstep over the intervals between consecutive timed points
  in which no validation ended;
- validation: its cadence is the median gap between validation steps; its duration the median,
  over the point pairs whose range holds exactly one validation, of the time beyond what their
  steps take at the training rate (never below 0);
- remaining = steps left × seconds per step + validations still due (multiples of the cadence
  after the current step, up to the end) × validation seconds; the ETA to a target step (the
  success criterion's ``by step N``) the same up to that step;
- cost so far = the attempt's $/hr × elapsed; cost to finish = $/hr × remaining.

Total steps come from the log (``step 43/311``, tqdm's ``43/311 [``), else the success
criterion's step, else ``resources.total_steps``. Everything unknown is None.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """Seconds and USD; None where unknown. ``eta_s``: to the target step (the success
    criterion's, else the end); ``eta_end_s``: to the last step."""

    step: int | None
    total_steps: int | None
    sec_per_step: float | None
    val_seconds: float | None
    val_every: int | None
    eta_s: float | None
    eta_end_s: float | None
    elapsed_s: float | None
    cost_usd: float | None
    cost_to_finish_usd: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_points(samples: list[tuple[float, int, str]]) -> list[tuple[float, int]]:
    """(time, highest step seen by then), one per distinct time, steps never decreasing."""
    by_time: dict[float, int] = {}
    for t, step, _ in samples:
        by_time[t] = max(step, by_time.get(t, step))
    points: list[tuple[float, int]] = []
    for t in sorted(by_time):
        if not points or by_time[t] >= points[-1][1]:
            points.append((t, by_time[t]))
    return points


def _validations_between(t0: float, t1: float, val_seen: dict[int, float]) -> int:
    """Validations that ended in (t0, t1]: a validation's sample is printed when it is done, so
    the time it took lies in the interval that ends with its sample."""
    return sum(1 for t in val_seen.values() if t0 < t <= t1)


def due_validations(after: int, until: int, every: int | None) -> int:
    """Multiples of ``every`` in (after, until]: the validations still to come."""
    if not every or until <= after:
        return 0
    return until // every - after // every


def estimate(samples: list[tuple[float, int, str]], now: float, total_steps: int | None = None,
             target_step: int | None = None, started_at: float | None = None,
             usd_per_hour: float | None = None) -> Progress:
    """The progress of one attempt from its samples ``(time seen (epoch s), step, metric name)``
    at ``now`` (epoch s). ``target_step``: the step the success criterion names (else the end)."""
    stepped = [(t, s, n) for t, s, n in samples if s is not None]
    step = max((s for _, s, _ in stepped), default=None)
    total = total_steps or target_step
    if total is not None and step is not None and step > total:
        total = None  # the log outran what we took for the end: no end known
    val_steps = sorted({s for _, s, n in stepped if n.startswith("val")})
    gaps = [b - a for a, b in zip(val_steps, val_steps[1:], strict=False) if b > a]
    val_every = int(statistics.median(gaps)) if gaps else (val_steps[0] if len(val_steps) == 1 else None)
    points = _timed_points(stepped)
    pairs = list(zip(points, points[1:], strict=False))
    val_seen: dict[int, float] = {}  # validation step -> when its first sample was seen
    for t, s, n in stepped:
        if n.startswith("val"):
            val_seen.setdefault(s, t)
    plain = [(t1 - t0, s1 - s0) for (t0, s0), (t1, s1) in pairs
             if s1 > s0 and _validations_between(t0, t1, val_seen) == 0]
    # time over steps of those intervals together: a tick that read two steps and one that read one
    # weigh as what they are (a median of per-interval rates would not)
    sec_per_step = sum(dt for dt, _ in plain) / sum(ds for _, ds in plain) if plain else None
    if sec_per_step is None and len(points) >= 2 and points[-1][1] > points[0][1]:
        (t0, s0), (t1, s1) = points[0], points[-1]  # every interval held a validation: the blended rate
        sec_per_step = (t1 - t0) / (s1 - s0)
    val_seconds = None
    if sec_per_step is not None:
        extra = [max(0.0, (t1 - t0) - sec_per_step * (s1 - s0)) for (t0, s0), (t1, s1) in pairs
                 if _validations_between(t0, t1, val_seen) == 1]
        val_seconds = statistics.median(extra) if extra else (0.0 if plain and not val_steps else None)

    def remaining(until: int | None) -> float | None:
        if until is None or step is None or sec_per_step is None:
            return None
        due = due_validations(step, until, val_every)
        if due and val_seconds is None:
            return None
        # time since the last point counts as progress already made on the current step
        since_last = max(0.0, now - points[-1][0]) if points else 0.0
        left = max(0, until - step) * sec_per_step + due * (val_seconds or 0.0) - since_last
        return max(0.0, left) if until > step else 0.0

    eta_end = remaining(total)
    eta = remaining(target_step) if target_step is not None else eta_end
    elapsed = max(0.0, now - started_at) if started_at is not None else None
    cost = usd_per_hour * elapsed / 3600 if usd_per_hour is not None and elapsed is not None else None
    cost_left = usd_per_hour * eta_end / 3600 if usd_per_hour is not None and eta_end is not None else None
    return Progress(step, total, sec_per_step, val_seconds, val_every, eta, eta_end, elapsed, cost, cost_left)
