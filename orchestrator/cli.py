"""The ``orchd`` command line (typer + rich). Thin: the work is in ``service``.

Exit codes: 0 done; 1 a job did not complete (``--wait``) or a check found problems; 2 the
input is wrong (spec, config, job id, arguments, a refused budget); 3 orchd or a backend
failed (e.g. sbatch refused, a provider's API is down); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.durations import format_duration
from orchestrator.errors import BudgetError, ConfigError, JobNotFound, OrchdError, SpecError, TickBusy
from orchestrator.shellsafe import printable
from orchestrator.states import JobState

if TYPE_CHECKING:
    from collections.abc import Iterator

    from orchestrator.app import App


class _Lazy:
    """``orchestrator.service`` imported on first use: `orchd --help` and `--version` need none
    of SQLAlchemy, the backends or the spec models (0.1 s instead of 0.45 s)."""

    def __getattr__(self, name: str) -> Any:
        import orchestrator.service as module

        return getattr(module, name)


service: Any = _Lazy()
app = typer.Typer(help="orchd: submit, watch and steer ML training jobs unattended.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
# a pipe gets wide lines (no truncation for grep); a terminal, or $COLUMNS, its own width
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
err = Console(stderr=True)
EXIT_JOB_FAILED, EXIT_INPUT, EXIT_ORCHD, EXIT_INTERRUPTED = 1, 2, 3, 130
VERBOSITY = {"level": 0}  # -q: -1, -v: 1, -vv: 2 (set by the callback, read by the daemon)


def flag(*names: str, **options: Any) -> Any:
    """A boolean option shown without a ``<bool>`` value in --help (it takes none)."""
    return typer.Option(*names, metavar="", **options)


def _exit_code(e: Exception) -> int:
    """2 for what the user can fix in their input, 3 for orchd's or a backend's failure."""
    if isinstance(e, (SpecError, ConfigError, JobNotFound, BudgetError, ValueError)):
        return EXIT_INPUT
    return EXIT_ORCHD


def _fail(e: Exception, code: int | None = None) -> None:
    err.print("[red]error:[/red] ", end="", highlight=False)
    err.print(str(e), highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(_exit_code(e) if code is None else code)


def _show_version(value: bool) -> None:
    if value:
        from orchestrator import __version__

        out.print(f"orchd {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, flag("--version", callback=_show_version, is_eager=True,
                                               help="print the version and exit")] = False,
         verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="more log lines on stderr "
                                                                                  "(-vv: debug, with APScheduler's)")]
         = 0,
         quiet: Annotated[bool, flag("-q", "--quiet", help="warnings and errors only")] = False) -> None:
    """orchd: submit, watch and steer ML training jobs unattended."""
    VERBOSITY["level"] = -1 if quiet else verbose
    _logging(daemon=False)


def _logging(daemon: bool) -> None:
    """Log lines on stderr: warnings by default (the daemon: orchd's own INFO lines too, not
    APScheduler's "Running job" ones); -v adds INFO, -vv DEBUG and APScheduler; -q warnings only."""
    v = VERBOSITY["level"]
    level = logging.WARNING if v < 0 else {0: logging.INFO if daemon else logging.WARNING, 1: logging.INFO}.get(
        v, logging.DEBUG)
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s" if daemon or v > 0 else "orchd: %(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, force=True)
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if v >= 2 else logging.WARNING)
    for noisy in ("httpx", "alembic"):  # a line per API call; per migration step on every start
        logging.getLogger(noisy).setLevel(logging.INFO if v >= 2 else logging.WARNING)


def _app() -> App:
    from orchestrator.app import open_app

    try:
        return open_app()
    except OrchdError as e:
        _fail(e)
        raise


def _json(data: Any) -> None:
    """``data`` as JSON on stdout: indented for a terminal, compact into a pipe (json's C encoder
    is used only without indent: 10,000 jobs in 0.05 s instead of 0.5 s). JSON has no NaN or
    Infinity: a NaN is written null, an infinity "inf" / "-inf"."""
    def clean(v: Any) -> Any:
        t = type(v)
        if t is float and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if t is dict:
            return {k: clean(x) for k, x in v.items()}
        if t is list:
            return [clean(x) for x in v]
        return v

    indent = 2 if sys.stdout.isatty() else None
    try:
        text = json.dumps(data, indent=indent, allow_nan=False)  # the usual case: nothing to clean
    except ValueError:
        text = json.dumps(clean(data), indent=indent)
    sys.stdout.write(text + "\n")


def _t(v: Any) -> str:
    """A user-supplied string for a rich cell: no terminal escapes, no markup (``[x]`` is text)."""
    return escape(printable(str(v)))


def _fmt(v: float | None) -> str:
    return "-" if v is None else ("nan" if v != v else f"{v:.4g}")


@app.command()
def submit(spec: Annotated[str, typer.Argument(metavar="SPEC", help="job spec YAML file")],
           wait: Annotated[bool, flag("--wait", help="follow until the job(s) end; exit 1 unless all "
                                                             "COMPLETED")] = False,
           force: Annotated[bool, flag("--force", help="submit even if the projected cost does not fit "
                                                               "a budget")] = False,
           dry_run: Annotated[bool, flag("--dry-run", help="show the script, the upload and the cost; "
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
    first = ids[0] if ids else None
    err.print(f"follow it: orchd logs {first} -f   |   details: orchd show {first}   |   all: orchd status"
              + ("" if _ticking(a) else "\nnothing ticks yet: run `orchd daemon` (or `orchd install-cron`) so the "
                                        "job(s) are watched"), highlight=False, markup=False)


@app.command()
def watch(slurm_job: Annotated[str, typer.Argument(metavar="SLURM_JOB", help="SLURM job id (123, or 123_4 for an "
                                                   "array task), or with --submitit the submitit folder")],
          cluster: Annotated[str | None, typer.Option("--cluster", help="cluster profile (default: the only one)")]
          = None,
          log: Annotated[str | None, typer.Option("--log", help="the job's log (default: its StdOut)")] = None,
          rules: Annotated[str | None, typer.Option("--spec", help="rules YAML: a spec without command (expect, "
                                                                   "success, cancel_if, notify, budget, retry)")]
          = None,
          submitit_job: Annotated[bool, flag("--submitit", help="SLURM_JOB is FOLDER/JOBID of a submitit "
                                                                        "job")] = False,
          wait: Annotated[bool, flag("--wait", help="follow until it ends; exit 1 unless COMPLETED")]
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


def _ticking(a: App, age: float | None = None) -> bool:
    """Whether a daemon or cron ticks: ``orchd daemon`` or ``orchd poll`` ran in the last
    2 minutes (cron's finest period is a minute) or 3 tick intervals. ``age``: the heartbeat's
    age in seconds when already read."""
    if age is None:
        from orchestrator.listing import beat_age, open_reader

        with open_reader(a) as r:
            age = beat_age(r)
    return age is not None and age < max(120.0, 3 * a.settings.tick_seconds)


def _wait(a: App, ids: list[int]) -> int:
    """Tick (or let the daemon tick) until every job ends; print progress lines. Ctrl-C stops
    following (exit 130); the jobs go on."""
    try:
        return _follow(a, ids)
    except KeyboardInterrupt:
        err.print(f"\nstopped following; job(s) {', '.join(map(str, ids))} go on while a daemon or cron ticks "
                  f"(`orchd status`; stop one: `orchd cancel {ids[0]}`)", highlight=False, markup=False)
        return EXIT_INTERRUPTED


def _follow(a: App, ids: list[int]) -> int:
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
def status(as_json: Annotated[bool, flag("--json", help="machine-readable: a list of objects")] = False,
           show_all: Annotated[bool, flag("--all", help="include jobs that ended over a day ago")] = False,
           limit: Annotated[int, typer.Option("--limit", min=0, help="the newest N jobs (0: every one)")] = 50,
           watch: Annotated[bool, flag("-w", "--watch", help="refresh in place until Ctrl-C")] = False,
           interval: Annotated[float, typer.Option("--interval", min=0.2, help="seconds between refreshes "
                                                                               "(--watch)")] = 2.0) -> None:
    """Jobs at a glance: state, attempt, step (of the total, when known), latest val_loss with the
    forecast's verdict, elapsed, time to finish, cost, reason. Fits the terminal: the backend,
    elapsed, attempt and ETA columns go first when it is narrow; state, step and reason never."""
    a = _app()
    if as_json:
        from orchestrator.listing import job_summaries, open_reader

        with open_reader(a) as r:
            _json(job_summaries(r, include_all=show_all, limit=limit or None))
        return
    if not watch:
        out.print(_status_view(a, show_all, limit))
        return
    from rich.live import Live

    if not out.is_terminal:  # Live redraws only on a terminal; say why nothing shows yet
        err.print(f"orchd status --watch: not a terminal, so the last view is printed at Ctrl-C "
                  f"(refreshed every {interval:g} s)", highlight=False, markup=False)
    try:
        with Live(_status_view(a, show_all, limit), console=out, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(_status_view(a, show_all, limit), refresh=True)
    except KeyboardInterrupt:
        return


STATUS_COLUMNS = ("ID", "NAME", "BACKEND", "STATE", "ATTEMPT", "STEP", "VAL_LOSS", "ELAPSED", "ETA", "COST", "REASON")
DROP_FIRST = ("BACKEND", "ELAPSED", "ATTEMPT", "ETA", "COST")  # what a narrow terminal loses first, in order


def _status_view(a: App, show_all: bool, limit: int = 0) -> Any:
    """The status table for the console's width (columns dropped in DROP_FIRST's order until it
    fits; NAME shortened last) of the newest ``limit`` jobs (0: all), with a line saying how many
    more there are, and a warning when active jobs have nothing ticking."""
    from rich.console import Group
    from rich.text import Text

    from orchestrator.listing import beat_age, count_jobs, job_summaries, open_reader

    with open_reader(a) as r:
        rows = job_summaries(r, include_all=show_all, limit=limit or None)
        more = count_jobs(r, include_all=show_all) - len(rows) if limit and len(rows) == limit else 0
        age = beat_age(r)
    cells = []
    for r in rows:
        p = r["progress"] or {}
        step = str(r["step"] if r["step"] is not None else "-") + (f"/{p['total_steps']}" if p.get("total_steps")
                                                                   else "")
        cells.append({"ID": str(r["id"]), "NAME": printable(r["name"]), "BACKEND": printable(r["backend"]),
                      "STATE": r["state"], "ATTEMPT": str(r["attempts"]), "STEP": step,
                      "VAL_LOSS": _fmt(r["metrics"].get("val_loss"))
                      + (f" {r['forecast']['verdict']}" if r["forecast"] else ""),
                      "ELAPSED": format_duration(r["elapsed"]), "ETA": _eta(p), "COST": _usd(r["cost_usd"]),
                      "REASON": printable(r["detail"] if r["state"] == "PENDING" and r["detail"] else r["reason"])})
    columns = list(STATUS_COLUMNS)
    natural = {c: max([len(c)] + [len(x[c]) for x in cells]) for c in columns}
    least = {**natural, "NAME": min(natural["NAME"], 12), "REASON": min(natural["REASON"], 12)}

    def fixed(cols: list[str]) -> int:  # the columns that are never cut, and one space between columns
        return sum(natural[c] for c in cols if c not in ("NAME", "REASON")) + len(cols) - 1

    for c in DROP_FIRST:
        if fixed(columns) + least["NAME"] + least["REASON"] <= out.width:
            break
        columns.remove(c)
    name_width = max(4, min(natural["NAME"], out.width - fixed(columns) - least["REASON"]))
    t = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    for c in columns:
        t.add_column(c, no_wrap=c != "REASON", overflow="fold" if c == "REASON" else "ellipsis",
                     min_width=None if c == "REASON" else name_width if c == "NAME" else natural[c],
                     max_width=name_width if c == "NAME" else None)
    color = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow"}
    for x in cells:
        t.add_row(*[Text(x[c], style=color.get(x["STATE"], "red") if c == "STATE" else "") for c in columns])
    parts: list[Any] = [t]
    if more > 0:
        parts.append(Text(f"... and {more} older job(s): orchd status{' --all' if show_all else ''} --limit 0"))
    active = [r for r in rows if not JobState(r["state"]).terminal]
    if active and not _ticking(a, age):
        parts.append(Text(("no daemon or cron tick " + (f"for {format_duration(age)}" if age is not None else "yet"))
                          + ": run `orchd daemon`, or `orchd install-cron` (orchd poll every minute)",
                          style="yellow"))
    return Group(*parts)


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
def show(job: Annotated[int, typer.Argument(metavar="JOB", help="job id")],
         as_json: Annotated[bool, flag("--json", help="machine-readable")] = False,
         script: Annotated[bool, flag("--script", help="print the batch script of the latest attempt "
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
    for a in d["attempts"]:
        if a["error_lines"]:
            out.print(f"[bold]attempt {a['number']} error[/bold] (the end of its log):", highlight=False)
            out.print("\n".join("  " + printable(ln) for ln in a["error_lines"]), highlight=False, markup=False)
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
def whatif(job: Annotated[int, typer.Argument(metavar="JOB", help="job id")],
           restart: Annotated[bool, flag("--restart", help="compare continuing with fixing and restarting "
                                                                   "(the one comparison so far; the default)")] = True,
           steps: Annotated[int | None, typer.Option("--steps", min=1, help="steps the restart runs (default: the "
                                                                             "target step)")] = None,
           fix: Annotated[str | None, typer.Option("--fix", help="time to fix before the restart, e.g. 40m")]
           = None,
           queue: Annotated[str | None, typer.Option("--queue", help="queue wait of the restart, e.g. 10m (default: "
                                                                      "SLURM's estimate, else recent attempts' "
                                                                      "median)")] = None,
           as_json: Annotated[bool, flag("--json", help="machine-readable")] = False) -> None:
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
def report(jobs: Annotated[list[int] | None, typer.Argument(metavar="[JOB]...", help="job id(s)")] = None,
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
def metrics(job: Annotated[int, typer.Argument(metavar="JOB", help="job id")],
            as_csv: Annotated[bool, flag("--csv", help="CSV: metric,attempt,step,epoch,value,time (epoch s)")]
            = False) -> None:
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
def logs(job: Annotated[int, typer.Argument(metavar="JOB", help="job id")],
         follow: Annotated[bool, flag("-f", "--follow", help="follow the job across its attempts until it ends")]
         = False,
         attempt: Annotated[int | None, typer.Option("--attempt", help="this attempt only (default: the latest)")]
         = None) -> None:
    """Print JOB's log (of its latest attempt); -f follows it while the job runs, on to each
    retry's log (a marker line between attempts), and ends when the job ends."""
    a = _app()
    try:
        backend, att, active = service.log_source(a, job, attempt)
    except OrchdError as e:
        _fail(e)
    offset, ended = 0, False
    while True:
        chunk = backend.read_log(att.backend_id or "", offset, 1 << 20)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            offset += len(chunk)
            continue
        if not follow or ended:
            return
        got = service.next_attempt(a, job, att.number) if attempt is None else None
        if got is not None:
            nxt, how = got
            sys.stdout.write(printable(f"==> orchd: attempt {att.number} ended ({how}); job {job} attempt "
                                       f"{nxt.number} ({nxt.backend_id}) <==") + "\n")
            sys.stdout.flush()
            att, offset = nxt, 0
            continue
        ended = service.job_state(a, job).terminal  # one more read after the end: nothing written last is lost
        if not ended:
            time.sleep(1.0)


@app.command()
def cancel(job: Annotated[int, typer.Argument(metavar="JOB", help="job id")]) -> None:
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
        with _collector_off():
            a.ticker.reconcile()
            r = a.ticker.tick()
        sent = a.flush_alerts()
    except TickBusy as e:
        err.print(f"{e}; nothing done", highlight=False, markup=False)
        return
    except OrchdError as e:
        _fail(e)
    service.beat(a)
    out.print(f"tick: {r.jobs} active jobs, {r.started} started, {r.bytes_read} log bytes, {r.events} events, "
              f"decisions: {', '.join(r.decisions) or 'none'}; {r.seconds:.3f}s; {sent} mail(s) sent", highlight=False)


@contextmanager
def _collector_off() -> Iterator[None]:
    """No cyclic garbage collection during a one-shot process's tick, and what it built frozen
    after (gc.freeze: never scanned again; the process ends soon). The collector's passes over
    what a first tick builds (10,000 jobs' specs, rule plans and parsers: ~460,000 objects) were a
    third of it or more (`orchd poll` at 10,000 jobs, bench/bench_tick.py --poll: 3.9-4.1 -> 2.2 s
    wall); the few cycles a tick leaves go with the process. The mail flush after it (plots)
    collects as usual."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@app.command()
def costs(by: Annotated[str, typer.Option("--by", metavar="job|project|backend|day", help="how to group")] = "job",
          as_json: Annotated[bool, flag("--json", help="machine-readable (every group)")] = False,
          limit: Annotated[int, typer.Option("--limit", min=0, help="--by job: the newest N jobs, the older ones "
                                                                    "summed in one line (0: every one)")] = 50) -> None:
    """Spend in USD and GPU-hours, grouped, with a total."""
    if by not in ("job", "project", "backend", "day"):
        _fail(ValueError(f"--by {by}: use job, project, backend or day"))
    from orchestrator.costs import summarize, usage_rows
    from orchestrator.listing import open_reader

    with open_reader(_app()) as r:
        rows = summarize(usage_rows(r), by)
    if as_json:
        _json(rows)
        return
    body, total = rows[:-1], rows[-1]
    older: list[dict[str, Any]] = []
    if by == "job":
        body.sort(key=lambda r: r["job"])
        if limit and len(body) > limit:
            older, body = body[:-limit], body[-limit:]
    t = Table(box=None, header_style="bold")
    for col in (by.upper(), "USD", "GPU-HOURS", "ATTEMPTS"):
        t.add_column(col, justify="left" if col == by.upper() else "right")
    if older:
        t.add_row(f"... {len(older)} older job(s)", f"{sum(r['usd'] for r in older):.4f}",
                  f"{sum(r['gpu_hours'] for r in older):.4f}", str(sum(r["attempts"] for r in older)))
    for r in [*body, total]:
        label = _t(f"{r[by]} {r.get('name', '')}".strip())
        t.add_row(label, f"{r['usd']:.4f}", f"{r['gpu_hours']:.4f}", str(r["attempts"]))
    out.print(t)


config_app = typer.Typer(help="The config file: where it is, whether it is valid, what it says.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("path")
def config_path() -> None:
    """Print the config file in use (and where else orchd looks)."""
    from orchestrator.config import config_places

    a = _app()
    places = config_places(os.environ, a.settings.home)
    out.print(str(a.settings.config_path), highlight=False, markup=False)
    for p in places:
        err.print(f"  {'in use' if p == a.settings.config_path else 'also read if the one above is absent'}: {p} "
                  f"({'exists' if p.exists() else 'absent'})", highlight=False, markup=False)


@config_app.command("check")
def config_check() -> None:
    """Validate the config file (errors with file:line and key path, exit 2) and what it needs
    from the environment: the secrets it names must be set (exit 1 when one is not)."""
    from orchestrator.config import api_key, smtp_password

    a = _app()
    try:
        cfg = a.config
    except OrchdError as e:
        _fail(e)
    problems = []
    for name, account in (("vastai", cfg.vastai), ("runpod", cfg.runpod)):
        if account is not None:
            try:
                api_key(account.api_key_env)
            except ConfigError as e:
                problems.append(f"{name}.api_key_env: {e}")
    if cfg.email is not None:
        try:
            smtp_password(cfg.email.password_env, cfg.email.password_file)
        except ConfigError as e:
            problems.append(str(e))
    if cfg.notify is not None and cfg.notify.urls:
        problems += [f"notify.urls: ${{{name}}} is not set" for name in sorted(cfg.notify.env_names())
                     if name not in os.environ]
        try:
            import apprise  # noqa: F401
        except ImportError:
            problems.append("notify.urls needs apprise: pip install 'orchd[notify]'")
    path = a.settings.config_path
    out.print(f"{path}: " + ("valid" if path.exists() else "absent (defaults: local backend only, no mail)")
              + f"; {len(cfg.clusters)} cluster profile(s)"
              + (f" ({', '.join(cfg.clusters)})" if cfg.clusters else "")
              + (f"; mail to {', '.join(cfg.email.to) or 'the specs’ recipients'} on {', '.join(cfg.email.on)}"
                 if cfg.email else "") + "".join(f"; {n}" for n, c in (("vastai", cfg.vastai), ("runpod", cfg.runpod))
                                                 if c is not None), highlight=False, markup=False)
    for msg in problems:
        err.print(f"problem: {msg}", highlight=False, markup=False)
    if problems:
        raise typer.Exit(EXIT_JOB_FAILED)


@config_app.command("show")
def config_show() -> None:
    """Print the config in effect, defaults filled in, as YAML (it holds no secrets: only the
    names of the variables and files that do)."""
    import yaml

    a = _app()
    try:
        cfg = a.config
    except OrchdError as e:
        _fail(e)
    sys.stdout.write(f"# {a.settings.config_path}\n" + yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True),
                                                                       sort_keys=False))


@app.command()
def health(max_age: Annotated[float, typer.Option("--max-age", help="seconds since the last daemon or cron tick")]
           = 120.0) -> None:
    """Exit 0 when a daemon or cron ticked in the last --max-age seconds, else 1 (a container's
    or a monitor's health check)."""
    a = _app()
    age = service.beat_age(a)
    ok = age is not None and age <= max_age
    out.print(f"{'ok' if ok else 'stale'}: last daemon or cron tick "
              + (f"{format_duration(age)} ago" if age is not None else "never"), highlight=False, markup=False)
    raise typer.Exit(0 if ok else EXIT_JOB_FAILED)


@app.command("install-cron")
def install_cron(uninstall: Annotated[bool, flag("--uninstall", help="remove orchd's crontab line")]
                 = False) -> None:
    """Run `orchd poll` every minute from your crontab (secrets: $XDG_CONFIG_HOME/orchd/orchd.env)."""
    from orchestrator import install

    try:
        out.print(install.install_cron(_app().settings, uninstall), highlight=False, markup=False)
    except OrchdError as e:
        _fail(e)


@app.command("install-service")
def install_service(uninstall: Annotated[bool, flag("--uninstall", help="stop, disable and remove the "
                                                                                "unit")] = False) -> None:
    """Run `orchd daemon` as a systemd user service (secrets: $XDG_CONFIG_HOME/orchd/orchd.env)."""
    from orchestrator import install

    try:
        out.print(install.install_service(_app().settings, uninstall), highlight=False, markup=False)
    except OrchdError as e:
        _fail(e)


@app.command()
def daemon(interval: Annotated[float | None, typer.Option(help="seconds between ticks (default "
                                                                "$ORCHD_TICK_SECONDS or 5)")] = None) -> None:
    """Tick forever (APScheduler); stops cleanly on SIGTERM."""
    from orchestrator.daemon import run_daemon

    _logging(daemon=True)
    a = _app()
    try:
        a.config  # noqa: B018 - a bad config file is an error at start, not a traceback on every tick
        run_daemon(a, interval)
    except OrchdError as e:
        _fail(e)


def run() -> None:
    """The ``orchd`` entry point: the typer app, with the database's errors (unreachable, locked,
    a schema it cannot read) said in one line (exit 3), never as a traceback."""
    try:
        app()
    except Exception as e:
        sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded if the database was touched; not imported here
        if sa_exc is None or not isinstance(e, sa_exc.SQLAlchemyError):
            raise
        detail = str(getattr(e, "orig", None) or e).splitlines()[0]
        err.print(f"[red]error:[/red] the job database: {type(e).__name__}: ", end="", highlight=False)
        err.print(detail, highlight=False, markup=False)
        sys.exit(EXIT_ORCHD)


if __name__ == "__main__":
    run()
