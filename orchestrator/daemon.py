"""``orchd daemon``: the tick on APScheduler, every ``tick_seconds`` (default 5 s).

``max_instances=1`` and ``coalesce=True``: a slow tick never overlaps itself and missed runs
are skipped, not replayed. SIGTERM/SIGINT stop the scheduler after the tick in progress.
"""

from __future__ import annotations

import logging
import signal
from datetime import datetime

from apscheduler.schedulers.blocking import BlockingScheduler

from orchestrator.errors import TickBusy
from orchestrator.service import App, beat

log = logging.getLogger("orchd.daemon")
RECONCILE_SECONDS = 300.0


def run_daemon(app: App, interval: float | None = None) -> None:
    """Tick until SIGTERM/SIGINT. ``interval`` in seconds overrides the configured one."""
    seconds = interval or app.settings.tick_seconds
    app.sessions  # noqa: B018 - open (and migrate) the database before the first tick
    def reconcile(lock_timeout: float | None = 5.0) -> None:
        try:
            done = app.ticker.reconcile(lock_timeout=lock_timeout)
        except TickBusy:
            return  # the next round will
        for name, orphans in done.items():
            if orphans:
                log.warning("reconciled %s: destroyed %d orphaned instance(s) %s", name, len(orphans), orphans)

    reconcile(lock_timeout=None)

    def tick() -> None:
        try:
            r = app.ticker.tick()
        except TickBusy:
            log.info("another tick is running (orchd poll?); skipped")
            return
        beat(app)
        if r.started or r.events or r.decisions:
            log.info("tick: %d jobs, %d started, %d log bytes, %d events, decisions: %s; %.3fs",
                     r.jobs, r.started, r.bytes_read, r.events, ", ".join(r.decisions) or "none", r.seconds)

    def send_alerts() -> None:  # its own job: a slow SMTP server never delays a tick
        try:
            n = app.flush_alerts()
        except Exception:  # noqa: BLE001 - never let mail kill the daemon
            log.exception("sending alerts failed; they stay in the outbox")
            return
        if n:
            log.info("sent %d alert mail(s)", n)

    scheduler = BlockingScheduler()
    scheduler.add_job(send_alerts, "interval", seconds=seconds, max_instances=1, coalesce=True, id="alerts")
    scheduler.add_job(tick, "interval", seconds=seconds, max_instances=1, coalesce=True, id="tick",
                      next_run_time=datetime.now())
    # not only at start: whatever a crash or a lost race left billing is found within RECONCILE_SECONDS
    scheduler.add_job(reconcile, "interval", seconds=RECONCILE_SECONDS, max_instances=1, coalesce=True,
                      id="reconcile")

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current tick", signum)
        scheduler.shutdown(wait=True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("orchd daemon: ticking every %.1fs, state in %s", seconds, app.settings.home)
    scheduler.start()
    log.info("orchd daemon stopped")
