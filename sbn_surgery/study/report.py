"""The study's report: per arm figures, paired differences against ``none`` (top-1 and the
feature-map figures of :mod:`.features`), and the plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import store
from .arms import Arm
from .features import FIGURES, run_figures
from .plots import plot_features, plot_study
from .stats import METHOD, direction, mean_std, paired_difference, t_quantile, verdict


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
    features_plot: Optional[str] = None
    from_study: Optional[str] = None
    feature_images: Optional[int] = None  # how many validation images the measures use

    def to_json(self) -> dict[str, Any]:
        return {"arms": self.arms, "differences": self.differences, "plot": self.plot,
                "features_plot": self.features_plot, "feature_images": self.feature_images,
                "output": self.output, "seeds": self.seeds, "epochs": self.epochs,
                "from_study": self.from_study}


def _arm_summary(arm: Arm, runs: list, growth: Optional[float], base_ips: Optional[float],
                 epochs: int) -> dict[str, Any]:
    top1_mean, top1_std = mean_std([r.val_top1 for r in runs])
    half = (t_quantile(len(runs) - 1) * top1_std / math.sqrt(len(runs))
            if top1_std is not None else None)
    loss_mean, loss_std = mean_std([r.val_loss for r in runs])
    ips = mean_std([r.images_per_s for r in runs])[0]
    figures = [run_figures(r.features, epochs) for r in runs]
    return {"name": arm.spec, "dir": arm.dir, "recipe": arm.recipe_name,
            "top1_mean": top1_mean, "top1_std": top1_std,
            # the 95 % t-interval of the mean over seeds (not paired: see differences)
            "top1_ci95": None if half is None else [top1_mean - half, top1_mean + half],
            "loss_mean": loss_mean, "loss_std": loss_std, "images_per_s": ips,
            # train-step time relative to none's (> 1: slower); the inverse of images/s
            "step_ratio": base_ips / ips if base_ips and ips else None,
            "rms_growth": growth,
            # the feature-map figures (features.FIGURES), mean over seeds
            "features": {k: _mean([f[k] for f in figures]) for k in FIGURES},
            "runs": [{"seed": r.seed, "dir": r.dir, "val_top1": r.val_top1, "features": f}
                     for r, f in zip(runs, figures)]}


def _mean(values: list) -> Optional[float]:
    return None if not values or None in values else mean_std(values)[0]


def _feature_differences(runs: list, base: list, epochs: int) -> dict[str, Any]:
    """Per figure, the paired difference arm - none over seeds (None where a value is missing)."""
    arm_f = [run_figures(r.features, epochs) for r in runs]
    base_f = [run_figures(r.features, epochs) for r in base]
    out: dict[str, Any] = {}
    for key in FIGURES:
        a, b = [f[key] for f in arm_f], [f[key] for f in base_f]
        if None in a or None in b or len(a) < 2:
            out[key] = None
            continue
        mean, ci = paired_difference(a, b)
        out[key] = {"mean": mean, "ci95": ci, "direction": direction(ci, len(a))}
    return out


def summarize(out: Path, given: dict[str, Any], arms: list[Arm], records: list,
              growth: dict[str, Optional[float]], write: bool) -> StudyResult:
    """Aggregate finished runs (all of them: a study reports only when every run is done).
    ``given``: the study's options as study.json stores them."""
    by_arm = {a.spec: sorted([r for r in records if r.arm == a.spec], key=lambda r: r.seed)
              for a in arms}
    base = by_arm["none"]
    epochs = int(given["epochs"])
    base_ips = mean_std([r.images_per_s for r in base])[0]
    summaries = [_arm_summary(a, by_arm[a.spec], growth.get(a.dir), base_ips, epochs)
                 for a in arms]
    diffs = []
    for a in arms:
        if a.spec == "none":
            continue
        mean, ci = paired_difference([r.val_top1 for r in by_arm[a.spec]],
                                     [r.val_top1 for r in base])
        diffs.append({"arm": a.spec, "vs": "none", "mean": mean, "ci95": ci,
                      "method": f"{METHOD} (n={len(base)}, df={len(base) - 1}), last-epoch "
                                "val top-1", "verdict": verdict(ci, len(base)),
                      "features": _feature_differences(by_arm[a.spec], base, epochs)})
    measured = any(r.features for r in records)
    about = store.read_features_about(Path(base[0].dir)) if measured else {}
    result = StudyResult(summaries, diffs, None, str(out),
                         list(range(given["seed"], given["seed"] + given["seeds"])), epochs,
                         sum(r.trained for r in records), records,
                         from_study=given.get("from_study"), feature_images=about.get("images"))
    if write:
        _write(out, given, arms, by_arm, result, about)
    return result


def _write(out: Path, given: dict[str, Any], arms: list[Arm], by_arm: dict[str, list],
           result: StudyResult, about: dict[str, Any]) -> None:
    """report.json, study.json with every run's measures, and the plots."""
    what = f"{given['model']} on {given['data']}"
    result.plot = str(out / store.PLOT_FILE)
    plot_study(Path(result.plot), arms, by_arm,
               f"{what}: val top-1, mean and +-1 std over {given['seeds']} seeds")
    if about:
        result.features_plot = str(out / store.FEATURES_PLOT_FILE)
        plot_features(Path(result.features_plot), arms, by_arm,
                      f"{what}: max |x| at the SBN sites on {about.get('images')} val images, "
                      f"mean and range over {given['seeds']} seeds")
    store.write_json(out / "report.json", result.to_json())
    features = {"measured": about,
                "runs": {a.spec: {str(r.seed): [r.features[e] for e in sorted(r.features)]
                                  for r in by_arm[a.spec]} for a in arms},
                "differences": [{"arm": d["arm"], "vs": d["vs"], **d["features"]}
                                for d in result.differences]}
    store.save_results(out, given, features)
