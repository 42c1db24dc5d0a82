"""The ``orchd`` command line (typer + rich). Thin: the work is in ``service``."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator import service
from orchestrator.durations import format_duration
from orchestrator.errors import OrchdError, TickBusy
from orchestrator.shellsafe import printable
from orchestrator.states import JobState

app = typer.Typer(help="orchd: submit, watch and steer ML training jobs unattended.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def _fail(e: Exception, code: int = 2) -> None:
    err.print("[red]error:[/red] ", end="", highlight=False)
    err.print(str(e), highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _app() -> service.App:
    try:
        return service.open_app()
    except OrchdError as e:
        _fail(e)
        raise


def _json(data: Any) -> None:
    def clean(v: Any) -> Any:  # JSON has no NaN: write null
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    sys.stdout.write(json.dumps(clean(data), indent=2) + "\n")


def _t(v: Any) -> str:
    """A user-supplied string for a rich cell: no terminal escapes, no markup (``[x]`` is text)."""
    return escape(printable(str(v)))


def _fmt(v: float | None) -> str:
    return "-" if v is None else ("nan" if v != v else f"{v:.4g}")


@app.command()
def submit(spec: Annotated[str, typer.Argument(help="job spec YAML file")],
           wait: Annotated[bool, typer.Option("--wait", help="follow until the job(s) end; exit 1 unless all "
                                                             "COMPLETED")] = False,
           force: Annotated[bool, typer.Option("--force", help="submit even if the projected cost does not fit "
                                                               "a budget")] = False,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="show the script, the upload and the cost; "
                                                                   "start and record nothing")] = False) -> None:
    """Validate SPEC, record its job(s) and start them. Prints the job id(s)."""
    a = _app()
    if dry_run:
        try:
            sys.stdout.write(printable(service.dry_run(a, spec)))
        except OrchdError as e:
            _fail(e)
        return
    try:
        ids = service.submit(a, spec, force=force)
    except OrchdError as e:
        _fail(e)
    for i in ids:
        out.print(i)
    if wait:
        raise typer.Exit(_wait(a, ids))


@app.command()
def watch(slurm_job: Annotated[str, typer.Argument(help="SLURM job id (123, or 123_4 for an array task), or with "
                                                        "--submitit the submitit folder")],
          cluster: Annotated[str | None, typer.Option("--cluster", help="cluster profile (default: the only one)")]
          = None,
          log: Annotated[str | None, typer.Option("--log", help="the job's log (default: its StdOut)")] = None,
          rules: Annotated[str | None, typer.Option("--spec", help="rules YAML: a spec without command (expect, "
                                                                   "success, cancel_if, notify, budget, retry)")]
          = None,
          submitit_job: Annotated[bool, typer.Option("--submitit", help="SLURM_JOB is FOLDER/JOBID of a submitit "
                                                                        "job")] = False,
          wait: Annotated[bool, typer.Option("--wait", help="follow until it ends; exit 1 unless COMPLETED")]
          = False) -> None:
    """Adopt a SLURM job orchd did not submit: poll it, read its log, apply the rules. Prints the job id."""
    from orchestrator import adopt

    a = _app()
    try:
        if submitit_job:
            import submitit

            folder, _, job_id = slurm_job.rstrip("/").rpartition("/")
            if not folder or not job_id:
                raise ValueError(f"--submitit takes FOLDER/JOBID (got {slurm_job!r})")
            job = adopt.watch_submitit(a, submitit.SlurmJob(folder, job_id), rules=rules, cluster=cluster)
        else:
            job = adopt.watch(a, slurm_job, cluster=cluster, log=log, rules=rules)
    except (OrchdError, ValueError) as e:
        _fail(e)
    out.print(job)
    if wait:
        raise typer.Exit(_wait(a, [job]))


def _wait(a: service.App, ids: list[int]) -> int:
    """Tick (or let the daemon tick) until every job ends; print progress lines."""
    seen: dict[int, tuple[Any, ...]] = {}
    while True:
        try:
            a.ticker.tick(lock_timeout=0)
        except TickBusy:
            pass
        a.flush_alerts()
        rows = {r["id"]: r for r in service.job_summaries(a, include_all=True) if r["id"] in ids}
        for i in ids:
            r = rows[i]
            key = (r["state"], r["attempts"], r["step"], r["metrics"].get("val_loss"), r["detail"])
            if seen.get(i) != key:
                seen[i] = key
                p = r["progress"] or {}
                err.print(f"job {i} {printable(r['name'])}: {r['state']} attempt {r['attempts']} "
                          f"step {r['step'] or '-'}" + (f"/{p['total_steps']}" if p.get("total_steps") else "") + " "
                          + (f"ETA {_eta(p)} " if p.get("eta_s") is not None else "") +
                          f"val_loss {_fmt(r['metrics'].get('val_loss'))}"
                          + (f" ({r['reason']}: {printable(r['detail'])})" if JobState(r["state"]).terminal
                             else f" ({printable(r['detail'])})" if r["state"] == JobState.PENDING and r["detail"]
                             else ""),
                          highlight=False, markup=False)
        if all(JobState(rows[i]["state"]).terminal for i in ids):
            return 0 if all(rows[i]["state"] == JobState.COMPLETED for i in ids) else 1
        time.sleep(min(a.settings.tick_seconds, 2.0))


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           show_all: Annotated[bool, typer.Option("--all", help="include jobs that ended over a day ago")] = False
           ) -> None:
    """Jobs at a glance: state, attempt, step (of the total, when known), latest val_loss, elapsed,
    time to finish, cost."""
    rows = service.job_summaries(_app(), include_all=show_all)
    if as_json:
        _json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "BACKEND", "STATE", "ATTEMPT", "STEP", "VAL_LOSS", "ELAPSED", "ETA", "COST",
                "REASON"):
        t.add_column(col, no_wrap=col != "REASON")
    for r in rows:
        color = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow"}.get(r["state"], "red")
        p = r["progress"] or {}
        step = str(r["step"] if r["step"] is not None else "-") + (f"/{p['total_steps']}" if p.get("total_steps")
                                                                   else "")
        t.add_row(str(r["id"]), _t(r["name"]), _t(r["backend"]), f"[{color}]{r['state']}[/]", str(r["attempts"]),
                  step, _fmt(r["metrics"].get("val_loss")) + (f" {r['forecast']['verdict']}" if r["forecast"] else ""),
                  format_duration(r["elapsed"]), _eta(p),
                  _usd(r["cost_usd"]), _t(r["detail"] if r["state"] == "PENDING" and r["detail"] else r["reason"]))
    out.print(t)


def _eta(p: dict[str, Any]) -> str:
    """Time to the target step (and its cost when priced), for a table cell."""
    if p.get("eta_s") is None:
        return "-"
    cost = p.get("cost_to_finish_usd")
    return format_duration(p["eta_s"]) + (f" +{_usd(cost)}" if cost else "")


SPARKS = "▁▂▃▄▅▆▇█"


def _spark(values: list[float], width: int = 60) -> str:
    """A terminal sparkline of ``values`` (means of equal buckets when there are more than
    ``width``); a non-finite value is a space."""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        buckets = [values[a:b] for a, b in zip(edges, edges[1:], strict=False)]
        values = [math.fsum(b) / len(b) if all(math.isfinite(v) for v in b) else math.nan for b in buckets]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    scale = (len(SPARKS) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join(SPARKS[round((v - lo) * scale)] if math.isfinite(v) else " " for v in values)


def _usd(x: float | None) -> str:
    """USD for a table: cents, or four decimals under a dollar (a few minutes of a rented GPU)."""
    x = x or 0.0
    return f"${x:.2f}" if x >= 1 or x == 0 else f"${x:.4f}"


@app.command()
def show(job: int, as_json: Annotated[bool, typer.Option("--json")] = False,
         script: Annotated[bool, typer.Option("--script", help="print the batch script of the latest attempt "
                                                                "(slurm)")] = False) -> None:
    """Everything about JOB: attempts, state history, metrics, checkpoint keys, actions."""
    try:
        if script:
            sys.stdout.write(service.attempt_script(_app(), job))
            return
        d = service.job_detail(_app(), job)
    except OrchdError as e:
        _fail(e)
    if as_json:
        _json(d)
        return
    out.print(f"[bold]job {d['id']}[/bold] {_t(d['name'])} on {_t(d['backend'])}: [bold]{d['state']}[/bold] "
              f"({d['reason']}{': ' + _t(d['detail']) if d['detail'] else ''})", highlight=False)
    out.print(f"command: {printable(d['command'])}", highlight=False, markup=False)
    if p := d.get("progress"):
        parts = [f"step {p['step']}" + (f"/{p['total_steps']}" if p["total_steps"] else "") if p["step"] else None,
                 f"{p['sec_per_step']:.2f} s/step" if p["sec_per_step"] else None,
                 f"validation {format_duration(p['val_seconds'])} every {p['val_every']} steps"
                 if p["val_seconds"] is not None and p["val_every"] else None,
                 f"ETA {_eta(p)}" if p["eta_s"] is not None else None,
                 f"to the end {format_duration(p['eta_end_s'])}" if p["eta_end_s"] not in (None, p["eta_s"]) else None]
        out.print("progress: " + ", ".join(x for x in parts if x), highlight=False, markup=False)
    if f := d.get("forecast"):
        out.print(f"forecast: {f['metric']} at step {f['at_step']}: {f['value']:.4g} (80 % band {f['low']:.4g}-"
                  f"{f['high']:.4g}, from {f['samples']} samples): {f['verdict']}", highlight=False, markup=False)
    t = Table(title="attempts", box=None, title_justify="left")
    for col in ("#", "STATE", "EXIT", "REASON", "BACKEND ID"):
        t.add_column(col)
    for a in d["attempts"]:
        t.add_row(str(a["number"]), a["state"], str(a["exit_code"] if a["exit_code"] is not None else "-"),
                  _t(a["reason"]), _t(a["backend_id"] or "-"))
    out.print(t)
    for name, series in d["metrics"].items():
        values = [p["value"] for p in series]
        finite = [v for v in values if math.isfinite(v)]
        out.print(f"[bold]{_t(name)}[/bold] ({len(series)} samples) {_spark(values)}"
                  + (f" min {_fmt(min(finite))} last {_fmt(values[-1])}" if finite else ""), highlight=False)
        if name.startswith("val") or len(series) <= 12:  # evaluations: every value, with its step
            out.print("  " + " ".join(
                f"{p['step'] if p['step'] is not None else 'e' + str(p['epoch'])}:{_fmt(p['value'])}"
                for p in series), highlight=False, markup=False)
    for kind in ("missing", "unexpected"):
        if d[f"{kind}_keys_count"] is not None:
            out.print(f"[bold]{kind}_keys[/bold] ({d[f'{kind}_keys_count']}): {_t(', '.join(d[f'{kind}_keys'][:10]))}"
                      + (" ..." if len(d[f"{kind}_keys"]) > 10 else ""), highlight=False)
    t = Table(title="actions", box=None, title_justify="left")
    for col in ("WHEN", "ATTEMPT", "ACTION", "WHY"):
        t.add_column(col)
    for x in d["actions"]:
        t.add_row(time.strftime("%H:%M:%S", time.localtime(x["at"])), str(x["attempt"] or "-"), x["kind"],
                  _t(x["reason"]))
    out.print(t)


@app.command()
def whatif(job: int,
           restart: Annotated[bool, typer.Option("--restart", help="compare continuing with fixing and restarting "
                                                                   "(the one comparison so far; the default)")] = True,
           steps: Annotated[int | None, typer.Option("--steps", min=1, help="steps the restart runs (default: the "
                                                                             "target step)")] = None,
           fix: Annotated[str | None, typer.Option("--fix", help="time to fix before the restart, e.g. 40m")]
           = None,
           queue: Annotated[str | None, typer.Option("--queue", help="queue wait of the restart, e.g. 10m (default: "
                                                                      "SLURM's estimate, else recent attempts' "
                                                                      "median)")] = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Continue JOB or fix and restart it? Time to the target step and GPU cost of each option."""
    from orchestrator.durations import parse_duration

    try:
        fix_s = parse_duration(fix) if fix not in (None, "0") else 0.0
        queue_s = parse_duration(queue) if queue not in (None, "0") else (0.0 if queue else None)
        w = service.whatif(_app(), job, steps=steps, fix_s=fix_s, queue_s=queue_s)
    except (OrchdError, ValueError) as e:
        _fail(e)
    if as_json:
        _json(w.as_dict())
        return
    out.print(f"job {job}: step {w.step} of target {w.target_step}; {format_duration(w.spent_s)} spent"
              + (f" ({_usd(w.spent_usd)})" if w.spent_usd else ""), highlight=False, markup=False)
    t = Table(box=None, header_style="bold")
    for col in ("OPTION", "STEPS", "VALIDATIONS", "WAIT", "RUN", "TOTAL", "GPU-HOURS", "COST"):
        t.add_column(col, justify="left" if col == "OPTION" else "right")
    for o in (w.cont, w.restart):
        t.add_row(o.name, str(o.steps), str(o.validations), format_duration(o.wait_s) if o.wait_s else "-",
                  format_duration(o.run_s), format_duration(o.total_s), f"{o.gpu_hours:.2f}",
                  _usd(o.usd) if o.usd is not None else "-")
    out.print(t)
    out.print(f"restart waits {format_duration(w.restart.wait_s)}: fix {format_duration(fix_s)} + queue "
              f"{format_duration(w.restart.wait_s - fix_s)} ({w.queue_from})", highlight=False, markup=False)
    verdict = f"{w.faster} reaches step {w.target_step} sooner by {format_duration(w.saves_s)}"
    if w.saves_usd is not None:
        cheaper = "restart" if (w.restart.usd or 0) < (w.cont.usd or 0) else "continue"
        verdict += f"; {cheaper} costs {_usd(w.saves_usd)} less in GPU time"
    out.print(verdict + " (at the rates measured so far)", highlight=False, markup=False)


@app.command()
def report(jobs: Annotated[list[int] | None, typer.Argument(help="job id(s)")] = None,
           output: Annotated[str | None, typer.Option("-o", "--output", help="report.html (one page, plots "
                                                                             "embedded) or report.md (plots beside "
                                                                             "it); default: Markdown on stdout")]
           = None,
           since: Annotated[str | None, typer.Option("--since", help="every job that changed in this window, "
                                                                      "e.g. 8h")] = None) -> None:
    """Report back on JOB(s): expectations and their verdicts, the metric at each evaluation, the
    final value against the baseline, timeline, attempts, cost, actions, and a plot."""
    from pathlib import Path

    from orchestrator.durations import parse_duration
    from orchestrator.report import html_page, markdown

    a = _app()
    try:
        ids = list(jobs or [])
        title = "orchd report: " + ", ".join(f"job {i}" for i in ids)
        if since is not None:
            window = parse_duration(since)
            ids += [i for i in service.changed_since(a, time.time() - window) if i not in ids]
            title = f"orchd: what changed in the last {format_duration(window)}"
        if not ids:
            if since is None:
                raise ValueError("name a job, or --since 8h for every job that changed in a window")
            out.print(f"no job changed in the last {format_duration(window)}", highlight=False)
            return
        reps = service.reports(a, ids)
    except (OrchdError, ValueError) as e:
        _fail(e)
    if output is None:
        sys.stdout.write(printable(markdown(reps, title)) + "\n")
        return
    path = Path(output)
    try:
        if path.suffix.lower() in (".html", ".htm"):
            path.write_text(html_page(reps, title, {r.id: r.plot() for r in reps}))
        elif path.suffix.lower() == ".md":
            images = {}
            for r in reps:
                if (png := r.plot()) is not None:
                    images[r.id] = f"{path.stem}-job{r.id}.png"
                    (path.parent / images[r.id]).write_bytes(png)
            path.write_text(markdown(reps, title, images))
        else:
            raise ValueError(f"-o {output}: write to a .html or a .md file")
    except (OSError, ValueError) as e:
        _fail(e)
    out.print(f"wrote {path}", highlight=False, markup=False)


@app.command()
def metrics(job: int, as_csv: Annotated[bool, typer.Option("--csv", help="CSV: metric,attempt,step,epoch,value,"
                                                                          "time (epoch s)")] = False) -> None:
    """Every metric sample of JOB, by the time orchd read it, then step."""
    import csv

    try:
        d = service.job_detail(_app(), job)
    except OrchdError as e:
        _fail(e)
    rows = [(name, p["attempt"], p["step"], p["epoch"], p["value"], p["at"])
            for name, series in d["metrics"].items() for p in series]
    rows.sort(key=lambda r: (r[5], r[1], -1 if r[2] is None else r[2], r[0]))  # time read, then step
    if as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["metric", "attempt", "step", "epoch", "value", "time"])
        w.writerows([printable(n), a, "" if st is None else st, "" if ep is None else ep, repr(v), f"{at:.3f}"]
                    for n, a, st, ep, v, at in rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("METRIC", "ATTEMPT", "STEP", "EPOCH", "VALUE", "TIME"):
        t.add_column(col)
    for n, a, st, ep, v, at in rows:
        t.add_row(_t(n), str(a), "-" if st is None else str(st), "-" if ep is None else str(ep), _fmt(v),
                  time.strftime("%H:%M:%S", time.localtime(at)))
    out.print(t)


@app.command()
def logs(job: int, follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
         attempt: Annotated[int | None, typer.Option("--attempt", help="default: the latest")] = None) -> None:
    """Print JOB's log (of its latest attempt); -f follows it while the job runs."""
    a = _app()
    try:
        backend, att, active = service.log_source(a, job, attempt)
    except OrchdError as e:
        _fail(e)
    offset = 0
    while True:
        chunk = backend.read_log(att.backend_id or "", offset, 1 << 20)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            offset += len(chunk)
            continue
        if not follow or service.job_state(a, job).terminal:
            return
        time.sleep(1.0)


@app.command()
def cancel(job: int) -> None:
    """Cancel JOB: stop its process group / allocation and mark it CANCELLED."""
    try:
        out.print(service.cancel(_app(), job))
    except OrchdError as e:
        _fail(e)


@app.command()
def poll() -> None:
    """Run one tick (for cron). Exits 0 without acting if another tick is running."""
    a = _app()
    try:
        a.ticker.reconcile()
        r = a.ticker.tick()
        sent = a.flush_alerts()
    except TickBusy as e:
        err.print(f"{e}; nothing done", highlight=False, markup=False)
        return
    except OrchdError as e:
        _fail(e)
    out.print(f"tick: {r.jobs} active jobs, {r.started} started, {r.bytes_read} log bytes, {r.events} events, "
              f"decisions {r.decisions or '-'}, {r.seconds:.3f}s; {sent} mail(s) sent", highlight=False)


@app.command()
def costs(by: Annotated[str, typer.Option("--by", help="job | project | backend | day")] = "job",
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Spend in USD and GPU-hours, grouped, with a total."""
    if by not in ("job", "project", "backend", "day"):
        _fail(ValueError(f"--by {by}: use job, project, backend or day"))
    rows = service.costs(_app(), by)
    if as_json:
        _json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in (by.upper(), "USD", "GPU-HOURS", "ATTEMPTS"):
        t.add_column(col, justify="left" if col == by.upper() else "right")
    for r in rows:
        label = _t(f"{r[by]} {r.get('name', '')}".strip())
        t.add_row(label, f"{r['usd']:.4f}", f"{r['gpu_hours']:.4f}", str(r["attempts"]))
    out.print(t)


@app.command()
def daemon(interval: Annotated[float | None, typer.Option(help="seconds between ticks (default "
                                                                "$ORCHD_TICK_SECONDS or 5)")] = None) -> None:
    """Tick forever (APScheduler); stops cleanly on SIGTERM."""
    from orchestrator.daemon import run_daemon

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = _app()
    try:
        a.config  # noqa: B018 - a bad config file is an error at start, not a traceback on every tick
        run_daemon(a, interval)
    except OrchdError as e:
        _fail(e)


if __name__ == "__main__":
    app()
