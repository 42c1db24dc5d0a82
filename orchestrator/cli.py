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
        pts = " ".join(f"{p['step'] if p['step'] is not None else 'e' + str(p['epoch'])}:{_fmt(p['value'])}"
                       for p in series[-12:])
        out.print(f"[bold]{name}[/bold] ({len(series)} samples) {pts}", highlight=False)
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
