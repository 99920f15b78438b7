"""The study's figures: ``study.png`` (val top-1 per epoch) and ``study_features.png`` (max |x|
at the SBN sites per epoch), one line per arm, seeds shaded. Matplotlib's Figure, no pyplot:
the caller's backend stays as it was."""

from __future__ import annotations

import io
import math
from pathlib import Path
from .arms import Arm

__all__ = ["plot_study", "plot_features"]


def plot_study(path: Path, arms: list[Arm], by_arm: dict[str, list], title: str) -> None:
    """Val top-1 (%) against epoch: each arm's mean over seeds, with a +-1 std band."""
    import numpy as np

    fig, ax = _figure()
    for arm in arms:
        runs = by_arm[arm.spec]
        n = min(len(r.history) for r in runs)
        curves = np.array([[100 * float(row["top1"]) for row in r.history[:n]] for r in runs])
        epochs = np.arange(1, n + 1)
        mean = curves.mean(axis=0)
        std = curves.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        if n == 1:  # a band needs two epochs: a bar instead
            ax.errorbar(epochs, mean, yerr=std, fmt="o", capsize=4, label=arm.spec)
            continue
        (line,) = ax.plot(epochs, mean, "o-", label=arm.spec)
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    _finish(fig, ax, path, "val top-1 (%)", title)


def plot_features(path: Path, arms: list[Arm], by_arm: dict[str, list], title: str,
                  metric: str = "max_abs") -> None:
    """``metric`` (max |x| over the SBN sites) against epoch, from 0 (initialization): each
    arm's mean over seeds (a line) and the range of its seeds (shaded); log scale unless a
    value is 0 (timm zero-initializes the norm that ends a residual branch, so sites there are
    0 at initialization)."""
    import numpy as np

    fig, ax = _figure()
    positive = True
    for arm in arms:
        curves = [_curve(r.features, metric) for r in by_arm[arm.spec]]
        n = min(len(c) for c in curves) if curves else 0
        if n == 0:
            continue
        values = np.array([c[:n] for c in curves])
        positive = positive and bool((values > 0).all())
        epochs = np.arange(0, n)
        (line,) = ax.plot(epochs, values.mean(axis=0), "o-", label=arm.spec)
        if len(curves) > 1:
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                            color=line.get_color(), alpha=0.2)
    if positive:
        ax.set_yscale("log")
    _finish(fig, ax, path, "max |x| at the SBN sites" + (" (log scale)" if positive else ""), title,
            xlabel="epoch (0: initialization)")


def _curve(rows: dict, metric: str) -> list[float]:
    """``metric`` at epochs 0, 1, ... up to the first epoch without a finite value."""
    out: list[float] = []
    for e in range(len(rows)):
        v = (rows.get(e) or {}).get(metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            break
        out.append(float(v))
    return out


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    return fig, fig.subplots()


def _finish(fig, ax, path: Path, ylabel: str, title: str, xlabel: str = "epoch") -> None:
    from matplotlib.ticker import MaxNLocator

    from ..files import atomic_write_bytes

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
