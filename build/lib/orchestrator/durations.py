"""Durations as users write them: ``30s``, ``20m``, ``1h30m``, ``2d``, or SLURM's time format.

SLURM's forms (sbatch(1), ``--time``): ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
``D-HH:MM:SS``. A bare number is refused: SLURM reads it as minutes, most tools as seconds,
and a wrong guess silently multiplies a time limit by 60.
"""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_UNIT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_FULL_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[smhd])+\s*")
_SLURM_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def parse_duration(text: str | int | float) -> float:
    """Return the duration in seconds (> 0). Raises ValueError naming the accepted forms."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f"{text!r} has no unit: write e.g. 30s, 20m, 2h, 1h30m or HH:MM:SS")
    s = text.strip().lower()
    if _UNIT_FULL_RE.fullmatch(s):
        seconds = sum(float(n) * _UNITS[u] for n, u in _UNIT_RE.findall(s))
    elif ":" in s or "-" in s:
        m = _SLURM_RE.fullmatch(s)
        if not m:
            raise ValueError(f"{text!r} is not a duration (e.g. 30s, 20m, 2h, 1h30m, HH:MM:SS, D-HH:MM)")
        days, a, b, c = (int(g) if g else None for g in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        else:  # MM:SS
            seconds = a * 60 + (b or 0)
    else:
        raise ValueError(f"{text!r} is not a duration: write e.g. 30s, 20m, 2h, 1h30m or HH:MM:SS")
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``1h02m05s``; ``None`` -> ``-``."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"
