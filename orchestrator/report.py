"""What a person writes when asked to "report back" on a run: each expectation with its
verdict, the metric at each evaluation, the final value and the improvement over a baseline,
the timeline, the attempts and why each ended, the cost, every action orchd took, and a plot.

Input: ``service.job_detail``'s dict and the job's spec (None when the stored spec cannot be
read: the report still says what was recorded). Output: Markdown (a terminal, a mail body, a
PNG beside it) or one self-contained HTML page (the PNG embedded as a data: URI). Every text
from a spec or a log is escaped for the format it goes into.
"""

from __future__ import annotations

import base64
import html
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.conditions import Threshold, parse_condition
from orchestrator.logparse import KeysReport
from orchestrator.plots import Target, metrics_png
from orchestrator.rules import check_keys
from orchestrator.spec import JobSpec

PLOTTED = ("val_loss", "train_loss")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # the plot; other metrics are in the tables


@dataclass
class JobReport:
    """The facts of one job's report, format-free. Times are epoch seconds, costs USD."""

    id: int
    name: str
    backend: str
    state: str
    reason: str
    detail: str
    headline: str  # one sentence: the final value, and against the baseline
    expectations: list[tuple[bool | None, str]]  # (met? None = not checked yet, sentence)
    success: list[tuple[bool, str]]
    eval_columns: list[str]
    evaluations: list[tuple[int, int, list[float | None]]]  # (attempt, step, value per eval_column)
    timeline: list[tuple[str, float]]
    attempts: list[dict[str, Any]]
    cost_usd: float
    gpu_hours: float
    actions: list[dict[str, Any]]
    targets: list[Target] = field(default_factory=list)
    baselines: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)

    @property
    def has_plot(self) -> bool:
        return any(self.series.get(k) for k in PLOTTED)

    def plot(self) -> bytes | None:
        """The PNG of val_loss and train_loss over steps (attempts, target and baseline marked);
        None when neither was logged with a step."""
        series = {k: v for k, v in self.series.items() if k in PLOTTED and v}
        if not series:
            return None
        return metrics_png(series, f"job {self.id} {self.name}: {self.state}",
                           [t for t in self.targets if t.metric in series],
                           {k: v for k, v in self.baselines.items() if k in series})


def _lower_is_better(metric: str, spec: JobSpec | None) -> bool:
    """The direction of ``metric``: the success criterion's (``<`` → lower), else lower (losses,
    errors), unless the name says accuracy or a score."""
    for c in _criteria(spec):
        if c.metric == metric and c.op in ("<", "<=", ">", ">="):
            return c.op.startswith("<")
    return not any(w in metric.lower() for w in ("acc", "f1", "auc", "score", "bleu", "iou", "precision", "recall"))


def _criteria(spec: JobSpec | None) -> list[Threshold]:
    if spec is None:
        return []
    out = []
    for text in spec.success_conditions():
        try:
            c = parse_condition(text)
        except ValueError:
            continue
        if isinstance(c, Threshold):
            out.append(c)
    return out


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _g(v: float | None) -> str:
    return "-" if v is None else ("nan" if v != v else f"{v:.4g}")


def build(d: dict[str, Any], spec: JobSpec | None) -> JobReport:
    """The report of one job from ``service.job_detail``'s dict ``d`` and its spec."""
    metrics: dict[str, list[dict[str, Any]]] = d["metrics"]
    last_attempt = max((a["number"] for a in d["attempts"]), default=1)

    expectations: list[tuple[bool | None, str]] = []
    for name, want in (spec.expect.metrics.items() if spec else ()):
        hit = next((p for p in metrics.get(name, []) if p["step"] is not None and p["step"] >= want.at_step), None)
        goal = f"{name} at step {want.at_step}: expected {want.approx:g} ± {want.tolerance:g}"
        if hit is None:
            expectations.append((None, f"{goal}; not reached yet"))
        else:
            ok = _finite(hit["value"]) and abs(hit["value"] - want.approx) <= want.tolerance
            expectations.append((ok, f"{goal}; got {_g(hit['value'])} at step {hit['step']}"
                                     + (f" (attempt {hit['attempt']})" if last_attempt > 1 else "")))
    for kind in ("missing", "unexpected"):
        want = getattr(spec.expect, f"{kind}_keys") if spec else None
        if want is None:
            continue
        count, keys = d[f"{kind}_keys_count"], d[f"{kind}_keys"]
        expected = f"at most {want.at_most}" if want.at_most is not None else f"{len(want.exactly or [])} expected"
        if count is None:
            expectations.append((None, f"{kind} keys: {expected}; no checkpoint-loading report seen yet"))
            continue
        problem = check_keys(kind, want, KeysReport(kind, tuple(keys), count, 0))
        listed = f" ({', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''})" if keys else ""
        expectations.append((problem is None, f"{kind} keys: {count} of {expected}{listed}"
                                              + (f": {problem}" if problem else "")))

    met = {text for a in d["attempts"] for text in a.get("success_met", [])}
    success = [(text in met, text) for text in (spec.success_conditions() if spec else [])]

    eval_columns = sorted(k for k in metrics if k.startswith("val"))
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for k in eval_columns:
        for p in metrics[k]:
            if p["step"] is not None:
                rows.setdefault((p["attempt"], p["step"]), {})[k] = p["value"]
    evaluations = [(a, s, [vals.get(k) for k in eval_columns]) for (a, s), vals in sorted(rows.items())]

    headline_metric = next((c.metric for c in _criteria(spec)), None) or \
        ("val_loss" if "val_loss" in metrics else next(iter(metrics), None))
    headline = "No metric logged yet."
    baselines = dict(spec.baseline) if spec else {}
    if headline_metric and metrics.get(headline_metric):
        pts = [p for p in metrics[headline_metric] if p["attempt"] == last_attempt and _finite(p["value"])] or \
              [p for p in metrics[headline_metric] if _finite(p["value"])]
        if pts:
            lower = _lower_is_better(headline_metric, spec)
            final, best = pts[-1], (min if lower else max)(pts, key=lambda p: p["value"])
            where = f"step {final['step']}" if final["step"] is not None else "the last sample"
            headline = f"Final {headline_metric} {_g(final['value'])} at {where}"
            if best is not final:
                headline += f" (best {_g(best['value'])} at step {best['step']})"
            if headline_metric in baselines and baselines[headline_metric] != 0:
                base = baselines[headline_metric]
                gain = (base - final["value"]) / abs(base) * 100 * (1 if lower else -1)
                headline += (f"; {abs(gain):.2f} % {'better' if gain >= 0 else 'worse'} than the baseline "
                             f"{base:g}")
            headline += "."
        else:
            headline = f"{headline_metric}: no finite value logged."

    firsts = [p for k in eval_columns for p in metrics[k] if p.get("at") is not None]
    timeline = [(what, t) for what, t in (
        ("submitted", d["created_at"]), ("started", d["started_at"]),
        ("first evaluation", min((p["at"] for p in firsts), default=None)),
        ("success criteria met", d["success_met_at"]), ("ended", d["ended_at"])) if t is not None]
    targets = [Target(c.metric, c.value, c.by_step, f"success {c.op}") for c in _criteria(spec)]
    series = {k: [(p["step"], p["value"], p["attempt"]) for p in pts if p["step"] is not None]
              for k, pts in metrics.items()}
    return JobReport(d["id"], d["name"], d["backend"], d["state"], d["reason"], d["detail"], headline, expectations,
                     success, eval_columns, evaluations, timeline, d["attempts"], d["cost_usd"],
                     sum(a.get("gpu_hours") or 0.0 for a in d["attempts"]), d["actions"], targets, baselines, series)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _mark(ok: bool | None) -> str:
    return {True: "✓", False: "✗", None: "…"}[ok]


def _usd(x: float) -> str:
    return f"${x:.2f}" if x >= 1 or x == 0 else f"${x:.4f}"


def _md(text: Any) -> str:
    """A value for a Markdown table cell or line: one line, no table breaks, no HTML tag (a ``<``
    that could open one is an entity; ``val_loss < 0.4`` stays as written)."""
    return _TAG_START.sub("&lt;", " ".join(str(text).split())).replace("|", "\\|")


def markdown(reports: list[JobReport], title: str, images: dict[int, str] | None = None) -> str:
    """The reports as one Markdown document; ``images``: job id → the PNG's file name to link."""
    out = [f"# {_md(title)}", ""]
    if len(reports) > 1:
        out += ["| job | name | state | reason | cost |", "|---|---|---|---|---|"]
        out += [f"| {r.id} | {_md(r.name)} | {r.state} | {_md(r.reason)} | {_usd(r.cost_usd)} |" for r in reports]
        out.append("")
    for r in reports:
        out += [f"## Job {r.id} {_md(r.name)} on {_md(r.backend)}: {r.state} ({_md(r.reason)})", "",
                _md(r.headline), ""]
        if r.detail:
            out += [f"Detail: {_md(r.detail)}", ""]
        if r.expectations or r.success:
            out += ["### Expectations and success", ""]
            out += [f"- {_mark(ok)} {_md(text)}" for ok, text in r.expectations]
            out += [f"- {_mark(ok)} success: {_md(text)}" for ok, text in r.success]
            out.append("")
        if images and r.id in images:
            out += [f"![job {r.id} metrics]({images[r.id]})", ""]
        if r.evaluations:
            multi = len({a for a, _, _ in r.evaluations}) > 1
            out += ["### Evaluations", "", "| " + " | ".join((["attempt"] if multi else []) + ["step"] + r.eval_columns)
                    + " |", "|" + "---|" * (len(r.eval_columns) + 1 + multi)]
            out += ["| " + " | ".join(([str(a)] if multi else []) + [str(s)] + [_g(v) for v in vals]) + " |"
                    for a, s, vals in r.evaluations]
            out.append("")
        out += ["### Timeline", ""] + [f"- {what}: {_when(t)}" for what, t in r.timeline] + [""]
        out += ["### Attempts", "", "| # | state | reason | exit | cost |", "|---|---|---|---|---|"]
        out += [f"| {a['number']} | {a['state']} | {_md(a['reason'])} | "
                f"{a['exit_code'] if a['exit_code'] is not None else '-'} | {_usd(a['cost_usd'] or 0.0)} |"
                for a in r.attempts]
        out += ["", f"Cost: {_usd(r.cost_usd)}, {r.gpu_hours:.3f} GPU-hours.", "", "### Actions", ""]
        out += [f"- {_when(a['at'])} {a['kind']}"
                + (f" (attempt {a['attempt']})" if a["attempt"] else "") + f": {_md(a['reason'])}"
                for a in r.actions]
        out.append("")
    return "\n".join(out)


def _h(text: Any) -> str:
    return html.escape(str(text))


def html_page(reports: list[JobReport], title: str, pngs: dict[int, bytes] | None = None) -> str:
    """The reports as one self-contained HTML page; ``pngs``: job id → plot, embedded."""
    css = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}"
           ".ok{color:#080}.bad{color:#b00}.wait{color:#888}img{max-width:100%}")
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{_h(title)}</title>",
           f"<style>{css}</style></head><body>", f"<h1>{_h(title)}</h1>"]

    def table(head: list[str], rows: list[list[Any]]) -> None:
        out.append("<table><tr>" + "".join(f"<th>{_h(c)}</th>" for c in head) + "</tr>")
        out.extend("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows)
        out.append("</table>")

    if len(reports) > 1:
        table(["job", "name", "state", "reason", "cost"],
              [[r.id, r.name, r.state, r.reason, _usd(r.cost_usd)] for r in reports])
    for r in reports:
        out += [f"<h2>Job {r.id} {_h(r.name)} on {_h(r.backend)}: {_h(r.state)} ({_h(r.reason)})</h2>",
                f"<p><b>{_h(r.headline)}</b></p>"]
        if r.detail:
            out.append(f"<p>Detail: {_h(r.detail)}</p>")
        if r.expectations or r.success:
            out.append("<h3>Expectations and success</h3><ul>")
            cls = {True: "ok", False: "bad", None: "wait"}
            out += [f"<li class='{cls[ok]}'>{_mark(ok)} {_h(text)}</li>" for ok, text in r.expectations]
            out += [f"<li class='{cls[ok]}'>{_mark(ok)} success: {_h(text)}</li>" for ok, text in r.success]
            out.append("</ul>")
        if pngs and pngs.get(r.id):
            out.append(f"<img alt='job {r.id} metrics' src='data:image/png;base64,"
                       f"{base64.b64encode(pngs[r.id]).decode()}'>")
        if r.evaluations:
            out.append("<h3>Evaluations</h3>")
            table(["attempt", "step", *r.eval_columns], [[a, s, *map(_g, vals)] for a, s, vals in r.evaluations])
        out.append("<h3>Timeline</h3>")
        table(["", "when"], [[what, _when(t)] for what, t in r.timeline])
        out.append("<h3>Attempts</h3>")
        table(["#", "state", "reason", "exit", "cost"],
              [[a["number"], a["state"], a["reason"], "-" if a["exit_code"] is None else a["exit_code"],
                _usd(a["cost_usd"] or 0.0)] for a in r.attempts])
        out.append(f"<p>Cost: {_usd(r.cost_usd)}, {r.gpu_hours:.3f} GPU-hours.</p><h3>Actions</h3>")
        table(["when", "attempt", "action", "why"],
              [[_when(a["at"]), a["attempt"] or "-", a["kind"], a["reason"]] for a in r.actions])
    out.append(f"<p><small>orchd report, {_h(_when(time.time()))}</small></p></body></html>")
    return "\n".join(out)
