"""Progress of a file transfer (uploads to and downloads from rented instances).

A rich progress bar on stderr when a person watches (stderr is a terminal: ``orchd submit
--wait``, ``orchd poll``); otherwise one log line with size and rate when it is done (the
daemon's log).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("orchd.transfer")


@contextmanager
def transfer_progress(what: str, total_bytes: int) -> Iterator[Callable[[int, int], None]]:
    """Yields a callback ``(bytes_done, bytes_total)`` in the form paramiko's SFTP ``put``/``get``
    call it."""
    t0 = time.perf_counter()
    if sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), transient=True) as bar:
            task = bar.add_task(what, total=total_bytes or None)
            yield lambda done, total: bar.update(task, completed=done, total=total or None)
    else:
        yield lambda done, total: None
    seconds = time.perf_counter() - t0
    log.info("%s: %.2f MB in %.1f s (%.1f MB/s)", what, total_bytes / 1e6, seconds,
             total_bytes / 1e6 / max(seconds, 1e-6))
