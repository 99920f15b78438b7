"""The study's report: per arm figures, paired differences against ``none``, and the plot."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import store
from .arms import Arm
from .stats import METHOD, mean_std, paired_difference, verdict


@dataclass
class StudyResult:
    """``arms`` and ``differences`` as in ``to_json``; top-1 figures are fractions in [0, 1]."""

    arms: list[dict[str, Any]]
    differences: list[dict[str, Any]]
    plot: Optional[str]
    output: str
    seeds: list[int]
    epochs: int
    trained_runs: int = 0  # how many runs this call trained or resumed (0: it only reported)
    records: list[Any] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"arms": self.arms, "differences": self.differences, "plot": self.plot,
                "output": self.output, "seeds": self.seeds, "epochs": self.epochs}


def _arm_summary(arm: Arm, runs: list, growth: Optional[float],
                 base_ips: Optional[float]) -> dict[str, Any]:
    top1_mean, top1_std = mean_std([r.val_top1 for r in runs])
    loss_mean, loss_std = mean_std([r.val_loss for r in runs])
    ips = mean_std([r.images_per_s for r in runs])[0]
    return {"name": arm.spec, "dir": arm.dir, "recipe": arm.recipe_name,
            "top1_mean": top1_mean, "top1_std": top1_std,
            "loss_mean": loss_mean, "loss_std": loss_std, "images_per_s": ips,
            # train-step time relative to none's (> 1: slower); the inverse of images/s
            "step_ratio": base_ips / ips if base_ips and ips else None,
            "rms_growth": growth,
            "runs": [{"seed": r.seed, "dir": r.dir, "val_top1": r.val_top1} for r in runs]}


def summarize(out: Path, given: dict[str, Any], arms: list[Arm], records: list,
              growth: dict[str, Optional[float]], write: bool) -> StudyResult:
    """Aggregate finished runs (all of them: a study reports only when every run is done)."""
    by_arm = {a.spec: sorted([r for r in records if r.arm == a.spec], key=lambda r: r.seed)
              for a in arms}
    base = by_arm["none"]
    base_ips = mean_std([r.images_per_s for r in base])[0]
    summaries = [_arm_summary(a, by_arm[a.spec], growth.get(a.dir), base_ips) for a in arms]
    diffs = []
    for a in arms:
        if a.spec == "none":
            continue
        mean, ci = paired_difference([r.val_top1 for r in by_arm[a.spec]],
                                     [r.val_top1 for r in base])
        diffs.append({"arm": a.spec, "vs": "none", "mean": mean, "ci95": ci,
                      "method": f"{METHOD} (n={len(base)}, df={len(base) - 1}), last-epoch "
                                "val top-1", "verdict": verdict(ci, len(base))})
    plot = None
    if write:
        plot = str(out / store.PLOT_FILE)
        plot_study(Path(plot), arms, by_arm, f"{given['model']} on {given['data']}: val top-1, "
                   f"mean and +-1 std over {given['seeds']} seeds")
    result = StudyResult(summaries, diffs, plot, str(out),
                         list(range(given["seed"], given["seed"] + given["seeds"])),
                         int(given["epochs"]), sum(r.trained for r in records), records)
    if write:
        store.write_json(out / "report.json", result.to_json())
    return result


def plot_study(path: Path, arms: list[Arm], by_arm: dict[str, list], title: str) -> None:
    """Val top-1 (%) against epoch: each arm's mean over seeds, with a +-1 std band."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    ax = fig.subplots()
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()

    def write(tmp: Path) -> None:
        Path(tmp).write_bytes(data)

    from ..files import atomic_write

    atomic_write(path, write)
