"""Continue or fix and restart? The comparison a researcher makes on paper when a run looks
wrong: "continue: 268 steps × 45 s + 10 validations × 20 min to go; restart: 40 min to fix,
10 min in the queue, then 150 steps at the same rate with their validations".

Both options are timed with the running attempt's own measured rates (``eta.Progress``:
seconds a training step, seconds a validation and its cadence), so the comparison is only as
good as those; the restart is assumed to run at the same rate on the same resources. Costs are
GPU time: the restart's fixing and queueing are not billed (the current attempt is cancelled
first), its run is, at the current attempt's $/hr and GPU count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.eta import Progress, due_validations


@dataclass(frozen=True)
class Option:
    """One way to reach the target step. Seconds; ``usd`` None when the backend is unpriced."""

    name: str
    steps: int  # training steps still to run
    validations: int  # validations still to run
    wait_s: float  # before the run goes on: fixing + queue (0 to continue)
    run_s: float  # training + validations
    total_s: float
    gpu_hours: float
    usd: float | None


@dataclass(frozen=True)
class WhatIf:
    """Continue vs. restart for one job: time and cost already spent, both options, and which
    reaches ``target_step`` first (``faster``: "continue" | "restart"; ``saves_s`` > 0)."""

    job_id: int
    target_step: int
    step: int
    spent_s: float
    spent_usd: float
    cont: Option
    restart: Option
    faster: str
    saves_s: float
    saves_usd: float | None
    queue_from: str = ""  # where the queue wait came from: "given", "sbatch --test-only", recent attempts

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["continue"] = d.pop("cont")
        return d


def compare(job_id: int, p: Progress, target_step: int, restart_steps: int, fix_s: float, queue_s: float,
            spent_s: float, spent_usd: float, gpus: int, usd_per_hour: float | None, queue_from: str = "given"
            ) -> WhatIf:
    """Continue (the rest of the way to ``target_step`` from ``p.step``) vs. restart (``fix_s``
    of fixing, ``queue_s`` of queueing, then ``restart_steps`` from step 0), at ``p``'s rates.
    Raises ValueError when the progress model has no training rate yet."""
    if p.step is None or p.sec_per_step is None:
        raise ValueError("no training rate measured yet (it takes two logged steps): nothing to compare")
    if target_step <= p.step:
        raise ValueError(f"step {p.step} is already at or past the target step {target_step}: nothing to compare")

    def option(name: str, after: int, until: int, wait: float) -> Option:
        vals = due_validations(after, until, p.val_every)
        if vals and p.val_seconds is None:
            raise ValueError("validations are due but their duration is not measured yet: nothing to compare")
        run = (until - after) * p.sec_per_step + vals * (p.val_seconds or 0.0)
        hours = run / 3600
        return Option(name, until - after, vals, wait, run, wait + run, gpus * hours,
                      usd_per_hour * hours if usd_per_hour else None)

    cont = option("continue", p.step, target_step, 0.0)
    restart = option("restart", 0, restart_steps, fix_s + queue_s)
    faster = "restart" if restart.total_s < cont.total_s else "continue"
    saves_usd = (abs(cont.usd - restart.usd) if cont.usd is not None and restart.usd is not None else None)
    return WhatIf(job_id, target_step, p.step, spent_s, spent_usd, cont, restart, faster,
                  abs(cont.total_s - restart.total_s), saves_usd, queue_from)
