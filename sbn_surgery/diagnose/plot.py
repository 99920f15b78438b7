"""The plot: feature-map RMS against depth, log scale, one line per setting."""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Union

from ..errors import SbnSurgeryError
from .report import Report

__all__ = ["plot_rms", "rms_figure"]


def plot_rms(reports: Sequence[Report], path: Union[str, os.PathLike], *,
             title: Optional[str] = None, weights: str = "") -> None:
    """Write a PNG (atomically) of :func:`rms_figure`."""
    from ..checkpoint import atomic_write

    fig = rms_figure(reports, title=title, weights=weights)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def rms_figure(reports: Sequence[Report], *, title: Optional[str] = None,
               weights: str = "") -> Any:
    """A matplotlib Figure of feature-map RMS against depth, log y-axis, one line per report,
    the stages marked, and each line's growth (last block / first block) in the legend.
    ``weights`` (e.g. "at initialization") goes into the default title."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if not reports:
        raise SbnSurgeryError("plot: no reports to plot")
    fig = Figure(figsize=(9, 5.2), dpi=120)
    ax = fig.add_subplot()
    markers = "osD^vP*X"
    for i, rep in enumerate(reports):
        pts = [(r.depth, r.rms) for r in rep.layers if r.rms > 0 and math.isfinite(r.rms)]
        growth = rep.growth()
        extra = f", last/first block \u00d7{_fmt(growth)}" if growth is not None else ""
        sbn = rep.sbn_layers > 0
        # SBN variants dashed with small filled markers, so a line that coincides with another
        # (BN and BN + SBN at timm's zero-initialized residual branches) stays visible.
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--" if sbn else "-",
                marker=markers[i % len(markers)], markersize=4 if sbn else 7,
                markerfacecolor=None if sbn else "none", linewidth=1.6 if sbn else 2.4,
                label=f"{rep.label or rep.variant}{extra}")
    ax.set_yscale("log")
    first = reports[0]
    # Stage boundaries, from the first report (all variants share the probe points).
    prev = None
    for rec in first.layers:
        if rec.stage != prev:
            if prev is not None:
                ax.axvline(rec.depth - 0.5, color="0.75", linestyle=":", linewidth=1)
            ax.annotate(rec.stage, xy=(rec.depth - 0.4, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -12), textcoords="offset points", fontsize=8, color="0.35")
            prev = rec.stage
    ax.set_xlabel("depth: residual block (or stage output), from input to output")
    ax.set_ylabel("feature-map RMS (log scale)")
    if title is None:
        size = "x".join(str(s) for s in first.input_size[1:]) if first.input_size else "?"
        stats = "batch statistics" if first.norm_stats == "batch" else "running statistics"
        title = (f"{first.model}{' ' + weights if weights else ''}: feature-map RMS by depth\n"
                 f"input {size}, {first.samples} samples, norm layers on {stats}")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.93), fontsize=9)
    fig.tight_layout()
    return fig


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.3g}"
    return f"{v:.2e}"
