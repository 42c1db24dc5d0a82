"""Cost accounting and budgets: pure arithmetic over attempts, plus the summaries `orchd costs` shows.

An attempt costs its $/hr recorded at launch x the seconds it ran (billing starts when it
starts running) and uses allocated GPUs x elapsed hours. Jobs, projects, backends and days
are sums of attempts. A budget scope (a job's own ``budget``, a project, the total) has limits
in USD and/or GPU-hours; its used fraction is the larger of the two.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.listing import Reader
    from orchestrator.models import Attempt, Job

# what `orchd costs` reads, in plain SQL through listing.Reader (the standard library's sqlite3 on
# a SQLite file): neither SQLAlchemy nor the ORM imported; tests/test_db.py holds the names to models.py
USAGE_COLUMNS = {"jobs": ("id", "name", "project", "backend"),
                 "attempts": ("job_id", "started_at", "ended_at", "cost_usd", "gpu_hours", "usd_per_hour", "gpus")}
USAGE_SQL = ("SELECT j.id, j.name, j.project, j.backend, a.started_at, a.ended_at, a.cost_usd, a.gpu_hours, "
             "a.usd_per_hour, a.gpus FROM attempts a JOIN jobs j ON a.job_id = j.id WHERE a.started_at IS NOT NULL")


def attempt_usage(att: Attempt, now: float, elapsed: float | None = None) -> tuple[float, float]:
    """(USD, GPU-hours) of an attempt so far; ``elapsed`` (s) when the backend reports it."""
    if elapsed is None:
        if att.started_at is None:
            return 0.0, 0.0
        elapsed = max(0.0, (att.ended_at or now) - att.started_at)
    hours = elapsed / 3600
    return (att.usd_per_hour or 0.0) * hours, (att.gpus or 0) * hours


@dataclass(frozen=True)
class Scope:
    """A budget: ``kind`` job | project | total, its limits and what it has spent."""

    kind: str
    name: str
    max_usd: float | None
    max_gpu_hours: float | None
    usd: float
    gpu_hours: float

    @property
    def fraction(self) -> float:
        """Share of the tighter limit used (0 when there is no limit)."""
        parts = [self.usd / self.max_usd if self.max_usd else 0.0,
                 self.gpu_hours / self.max_gpu_hours if self.max_gpu_hours else 0.0]
        return max(parts)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    def describe(self) -> str:
        limits = []
        if self.max_usd:
            limits.append(f"${self.usd:.2f} of ${self.max_usd:.2f}")
        if self.max_gpu_hours:
            limits.append(f"{self.gpu_hours:.2f} of {self.max_gpu_hours:.2f} GPU-hours")
        return f"{self.kind} {self.name}: " + ", ".join(limits) + f" ({self.fraction:.0%})"


def crossed(scope: Scope, thresholds: list[float]) -> list[float]:
    """The alert thresholds (fractions) a scope has reached, ascending."""
    return sorted(t for t in thresholds if scope.fraction >= t)


def usage_rows(r: Reader, now: float | None = None) -> list[dict[str, Any]]:
    """One row per attempt that has run: job, project, backend, day (UTC, of its start), usd, gpu_hours.
    ``r``: a listing.Reader (``open_reader``, ``session_reader``). Reads only those columns (a
    job's spec is kilobytes); an attempt still running costs its $/hr x the hours so far."""
    now = time.time() if now is None else now
    rows = []
    for job_id, name, project, backend, started, ended, cost, gpu_hours, rate, gpus in r.rows(USAGE_SQL):
        if ended:
            usd, gh = cost, gpu_hours
        else:
            hours = max(0.0, now - started) / 3600
            usd, gh = (rate or 0.0) * hours, (gpus or 0) * hours
        rows.append({"job": job_id, "name": name, "project": project or "-", "backend": backend,
                     "day": time.strftime("%Y-%m-%d", time.gmtime(started)), "usd": usd, "gpu_hours": gh})
    return rows


def summarize(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Group usage rows by ``job``, ``project``, ``backend`` or ``day``; adds a total row last."""
    groups: dict[Any, dict[str, Any]] = defaultdict(lambda: {"usd": 0.0, "gpu_hours": 0.0, "attempts": 0})
    for r in rows:
        g = groups[r[by]]
        g["usd"] += r["usd"]
        g["gpu_hours"] += r["gpu_hours"]
        g["attempts"] += 1
        if by == "job":
            g["name"] = r["name"]
    out = [{by: k, **v} for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    out.append({by: "TOTAL", "usd": sum(r["usd"] for r in rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
                "attempts": len(rows)})
    return out


def _budget_of(spec_json: str) -> Any:
    """A job's own budget (spec ``budget``) from its stored spec; None when that cannot be read
    (that job fails on its own with ORCHD_ERROR; the budgets of the others still apply)."""
    from orchestrator.spec import JobSpec

    try:
        return JobSpec.from_stored(spec_json).budget
    except ValueError:
        return None


def budgets_apply(budgets: Any, specs: Iterable[Any]) -> bool:
    """Whether any budget has a limit: the config's ``budgets`` or a job's own (of these specs:
    JobSpecs, or stored texts, which are parsed through the spec cache)."""
    if budgets.projects or budgets.total is not None:
        return True
    from orchestrator.spec import JobSpec

    return any(sp.budget if isinstance(sp, JobSpec) else _budget_of(sp) for sp in specs)


def budget_scopes(s: Any, budgets: Any) -> list[tuple[Scope, list[Job]]]:
    """Every budget with a limit — each active job's own ``budget``, each of the config's
    ``budgets.projects``, ``budgets.total`` — with what it has spent (USD, GPU-hours: the sums
    of the attempts' recorded figures) and, once it has reached one of ``budgets.alerts_at`` or
    its limit, the active jobs it covers (else an empty list: at 10,000 active jobs, loading
    them all each tick for nothing cost a quarter of a second). ``s``: an ORM Session;
    ``budgets``: the config's ``Budgets``. One usage query, none when no budget applies."""
    from sqlalchemy import func, select

    from orchestrator.models import Attempt, Job
    from orchestrator.states import ACTIVE

    is_active = Job.state.in_([a.value for a in ACTIVE])
    active = s.execute(select(Job.id, Job.project, Job.spec_json).where(is_active).order_by(Job.id)).all()
    own = {i: _budget_of(text) for i, _, text in active}
    if not budgets_apply(budgets, ()) and not any(own.values()):
        return []  # nothing to check: skip the usage query on the tick's path
    usage = s.execute(select(Job.id, Job.project, func.sum(Attempt.cost_usd), func.sum(Attempt.gpu_hours))
                      .join(Attempt).group_by(Job.id)).all()
    by_job = {i: (u or 0.0, g or 0.0) for i, _, u, g in usage}  # one lookup per job, not a scan per job
    scopes: list[tuple[Scope, list[int]]] = []
    for i, _, _ in active:
        if (b := own[i]) is not None:
            usd, gh = by_job.get(i, (0.0, 0.0))
            scopes.append((Scope("job", str(i), b.max_usd, b.max_gpu_hours, usd, gh), [i]))
    for name, limit in budgets.projects.items():
        rows = [(u or 0, g or 0) for _, p, u, g in usage if p == name]
        scopes.append((Scope("project", name, limit.max_usd, limit.max_gpu_hours, sum(r[0] for r in rows),
                             sum(r[1] for r in rows)), [i for i, p, _ in active if p == name]))
    if budgets.total is not None:
        scopes.append((Scope("total", "all", budgets.total.max_usd, budgets.total.max_gpu_hours,
                             sum(u or 0 for *_, u, _ in usage), sum(g or 0 for *_, g in usage)),
                       [i for i, _, _ in active]))
    reached = [ids if scope.fraction >= 1.0 or crossed(scope, budgets.alerts_at) else [] for scope, ids in scopes]
    jobs = {j.id: j for j in s.scalars(select(Job).where(is_active))} if any(reached) else {}
    out = [(scope, [jobs[i] for i in ids if i in jobs]) for (scope, _), ids in zip(scopes, reached, strict=True)]
    return out
