"""Launch leases: how the orchd process launching an attempt on a rented instance tells every
other orchd process, on any host sharing the database, that the launch is alive.

A launch (rent, wait for SSH, upload, start) runs in a worker thread for minutes. Processes of
the same ``$ORCHD_HOME`` see it by its lock file; other homes cannot, and used to take a launch
whose instance answered SSH before its command started for one whose orchd had died: they
destroyed the instance and launched the attempt again, while the first launcher, its upload cut,
went on to its next offer (the job ran twice). The tick commits ``attempts.launch_lease_until``
= now + LEASE_SECONDS with the attempt's intent, before the backend is asked (so whoever reads
the attempt's backend id reads its lease too: a first renewal that comes late is covered), and
the launching process renews it every LEASE_SECONDS / 4 from a thread of its own (so a long boot
or upload keeps it); no process takes a leased launch for abandoned. Once the launcher dies,
its lease lapses within LEASE_SECONDS and the usual handling of an interrupted launch applies.
Hosts' clocks must agree within a minute or so.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("orchd.leases")
LEASE_SECONDS = 120.0
_LABEL = re.compile(r"orchd-(\d+)-a(\d+)")  # SubmitRequest.run_name


def write(sessions: sessionmaker[Session], label: str, until: float | None) -> None:
    """Set the launch lease of the attempt named ``label`` (``orchd-<job>-a<n>``) to ``until``
    (epoch s). A label of another form is ignored."""
    from orchestrator.models import Attempt

    m = _LABEL.fullmatch(label)
    if m is None:
        return
    with sessions.begin() as s:
        s.execute(update(Attempt).where(Attempt.job_id == int(m[1]), Attempt.number == int(m[2]))
                  .values(launch_lease_until=until))


def hold(writer: Callable[[str, float | None], None], label: str, done: threading.Event) -> threading.Thread:
    """Start a thread that keeps ``label``'s lease (``writer(label, until)``) until ``done`` is set.
    The lease is then left to lapse, not cleared: a command just started in the background has
    no log yet for a moment, and must not look abandoned in that moment. A failed write is
    logged and tried again at the next renewal."""

    def renew() -> None:
        while True:
            try:
                writer(label, time.time() + LEASE_SECONDS)
            except Exception as e:  # noqa: BLE001 - the launch goes on; the next renewal tries again
                log.warning("launch lease of %s not renewed: %s: %s", label, type(e).__name__, e)
            if done.wait(LEASE_SECONDS / 4):
                break

    t = threading.Thread(target=renew, name=f"lease-{label}", daemon=True)
    t.start()
    return t
