"""Will the run meet its success criterion? A forecast of a metric at the criterion's step from
the samples so far, with an uncertainty band and a verdict.

Model: the learning curve ``L(step) = a + b · step^(-c)`` (a ≥ 0, b ≥ 0, 0 < c ≤ 3), fitted by
least squares (``scipy.optimize.curve_fit``, trust-region reflective within those bounds).
Why this one: a loss falling as a power of the steps toward a floor ``a`` is the form deep
learning curves take over most of a run (the scaling-law literature, e.g. Kaplan et al. 2020,
and learning-curve extrapolation, Domhan et al. 2015, use it); it has three parameters, so it
can be fitted from a handful of evaluations; it is monotone, so it cannot invent a late dip.

The band: the prediction ± (twice the residuals' standard deviation, the noise the curve does
not explain, + how far the prediction moves when the newest one or two evaluations are left
out, since an extrapolation is only as steady as that). Sampling the parameters from the fit's
covariance was tried first and gave absurd bands: b and c are strongly correlated, and the
normal approximation wanders into curves no run follows. Verdict for a criterion
``metric OP threshold by step N``: the whole band on the good side → ``on track``, the whole
band on the bad side → ``will miss``, else ``at risk``. With fewer than ``MIN_SAMPLES``
samples, or a fit that does not converge, there is no forecast (None), never a guess.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.conditions import OPS, Threshold

MIN_SAMPLES = 5


@dataclass(frozen=True)
class Forecast:
    """``value`` predicted for ``metric`` at ``at_step``, with the band [``low``, ``high``] and
    the ``verdict`` against the criterion (on track / at risk / will miss)."""

    metric: str
    at_step: int
    value: float
    low: float
    high: float
    verdict: str
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.metric} at step {self.at_step}: {self.value:.4g} (80 % band {self.low:.4g}-{self.high:.4g}, "
                f"from {self.samples} samples): {self.verdict}")


def _curve(step: Any, a: float, b: float, c: float) -> Any:
    return a + b * step ** (-c)


def forecast(points: list[tuple[int, float]], criterion: Threshold) -> Forecast | None:
    """Forecast ``criterion.metric`` at ``criterion.by_step`` from ``points`` ``(step, value)``
    (finite values, steps > 0; the latest value per step counts). None when the criterion has no
    step, the step is already past, there are too few samples, or the fit fails."""
    import numpy as np

    target = criterion.by_step
    by_step: dict[int, float] = {}
    for step, value in points:
        if step and step > 0 and value is not None and math.isfinite(value):
            by_step[step] = value
    if target is None or len(by_step) < MIN_SAMPLES or max(by_step) >= target:
        return None
    x = np.array(sorted(by_step), dtype=float)
    y = np.array([by_step[int(s)] for s in x], dtype=float)
    fits = [_fit(x[: len(x) - k], y[: len(y) - k]) for k in (0, 1, 2)]  # all, then without the newest
    if fits[0] is None:
        return None
    params = fits[0]
    value = float(_curve(float(target), *params))
    residual = float(np.std(y - _curve(x, *params)))
    moved = max((abs(float(_curve(float(target), *p)) - value) for p in fits[1:] if p is not None), default=value)
    spread = 2 * residual + moved
    low, high = value - spread, value + spread
    if not all(math.isfinite(v) for v in (value, low, high)):
        return None
    good = OPS[criterion.op]
    verdict = ("on track" if good(high, criterion.value) and good(low, criterion.value)
               else "will miss" if not good(high, criterion.value) and not good(low, criterion.value)
               else "at risk")
    return Forecast(criterion.metric, target, value, low, high, verdict, len(by_step))


def _fit(x: Any, y: Any) -> Any:
    """The curve's (a, b, c) fitted to ``x``, ``y``, or None if the fit fails."""
    import warnings

    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    if len(x) < MIN_SAMPLES - 2:
        return None
    floor = float(y.min())
    start = (max(0.0, floor * 0.9), max(1e-9, float(y[0] - floor * 0.9)) * x[0] ** 0.5, 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_curve, x, y, p0=start, bounds=([0.0, 0.0, 1e-3], [np.inf, np.inf, 3.0]),
                                  maxfev=5000)
    except (RuntimeError, ValueError):
        return None
    return params
