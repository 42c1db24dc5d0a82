"""Plots of a job's metrics for reports and digest mails: PNG bytes from matplotlib's Agg
backend (no display, no pyplot global state, so a daemon thread can draw)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Target:
    """A horizontal line to reach: the success criterion's ``metric OP value [by step N]``."""

    metric: str
    value: float
    by_step: int | None = None
    label: str = "target"


def metrics_png(series: dict[str, list[tuple[int, float, int]]], title: str, targets: list[Target] = (),
                baselines: dict[str, float] | None = None, width_in: float = 7.0, height_in: float = 4.0,
                dpi: int = 100) -> bytes:
    """A PNG of ``series`` (metric → [(step, value, attempt)]) over steps: one colour per metric,
    one line style per attempt (labelled when there are several), the ``targets`` as dotted
    lines (with the step they are due by), ``baselines`` (metric → value) as dash-dotted ones.
    Non-finite values are left out (a NaN breaks the line there). Returns the PNG's bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors: dict[str, str] = {}
    attempts = sorted({a for pts in series.values() for _, _, a in pts})
    for i, (name, pts) in enumerate(sorted(series.items())):
        colors[name] = f"C{i % 10}"
        for a in attempts:
            mine = [(s, v if math.isfinite(v) else math.nan) for s, v, att in pts if att == a]
            if not mine:
                continue
            label = name + (f" (attempt {a})" if len(attempts) > 1 else "")
            ax.plot([s for s, _ in mine], [v for _, v in mine], LINESTYLES[(a - 1) % len(LINESTYLES)],
                    color=colors[name], label=label, marker="o" if name.startswith("val") else None,
                    markersize=3, linewidth=1.2)
    for t in targets:
        c = colors.get(t.metric, "black")
        ax.axhline(t.value, color=c, linestyle=":", linewidth=1, label=f"{t.label}: {t.metric} {t.value:g}")
        if t.by_step is not None:
            ax.axvline(t.by_step, color="grey", linestyle=":", linewidth=1)
    for metric, value in (baselines or {}).items():
        ax.axhline(value, color=colors.get(metric, "black"), linestyle="-.", linewidth=1,
                   label=f"baseline: {metric} {value:g}")
    finite = [v for pts in series.values() for _, v, _ in pts if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")  # losses that fall by decades: a linear axis shows only the first few steps
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
