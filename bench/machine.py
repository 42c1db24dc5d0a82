"""A yardstick for this machine's speed, printed beside the benches' figures.

A shared VM's speed swings between runs (``sum(range(10**6))`` took 12.5-21.5 ms here within
minutes on 2026-12-04, and the tick's figures moved with it): a figure read beside the
yardstick of its run tells the code's speed from the machine's.
"""

from __future__ import annotations

import time


def machine_speed() -> float:
    """Milliseconds for ``sum(range(10**6))``, the best of 5 (lower is faster)."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        sum(range(10**6))
        best = min(best, time.perf_counter() - t)
    return best * 1e3
