"""`sbn-surgery study`: does SBN help this model on this data? Arms x seeds, paired."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sbn_surgery.errors import SbnSurgeryError

from .common import err_console, main_process, out, print_json, progress_bar
from .run_options import with_run_options

ORDER = 35


#: Options whose finetune help does not hold for a study.
HELPS = {
    "force": "Apply each arm's recipe even where its `models:` patterns do not name MODEL.",
    "epochs": "Epochs of every run (cooldown epochs come after). A study's options are fixed "
              "when it starts: running it again with another value is refused; use another "
              "--output.",
}


@with_run_options(exclude=("model", "recipe", "checkpoint_key", "seed"), helps=HELPS)
def study(
    model: str = typer.Argument(..., help="A timm model name (each arm converts it)."),
    arms: Optional[str] = typer.Option(None, "--arms", "-a", help="Comma-separated arms: none "
                                       "(no SBN), a recipe name or YAML path, NAME:frequency or "
                                       "NAME:channel (stats mode), NAME+remove-bn (no BatchNorm). "
                                       "[default: none and the model family's recipe]"),
    seeds: int = typer.Option(3, min=1, help="Runs per arm (seeds SEED..SEED+N-1); 2 or more."),
    seed: int = typer.Option(0, help="First seed."),
    output: Path = typer.Option(Path("runs/study"), "--output", "-o", help="Directory of the "
                                "study: ARM/seedK/ runs, study.json, report.json, study.png."),
    from_study: Optional[Path] = typer.Option(
        None, "--from-study", metavar="DIR", help="Start every arm of seed K from DIR's "
        "none/seedK/best.safetensors (a finished study of MODEL): the trained model fine-tuned "
        "without SBN (none) or converted with the recipe's init (auto: identity) and "
        "fine-tuned."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: arms, "
                                  "differences, plot."),
    options: Optional[dict] = None,
) -> None:
    """Fine-tune MODEL once per arm and seed, and compare every arm with none.

    Within a seed, all arms start from the same weights and see the same batches, so the
    difference in val top-1 is paired; it is reported with a 95 % t-interval over seeds and a
    verdict. Arm directories: resnet:frequency -> resnet-frequency, a file x/my.yaml ->
    file-my. Run the same command again to resume an interrupted study; a finished one is only
    reported again.

    [bold]Examples[/bold]

      sbn-surgery study resnet18 -d fashion-mnist -a none,resnet,resnet:frequency

      sbn-surgery study resnet18 -d digits --seeds 5 --epochs 3 -o runs/s1

      sbn-surgery study resnet18 --data digits --arms none,resnet+remove-bn --json

      sbn-surgery study resnet18 -d digits --from-study runs/s1 -o runs/s2
    """
    from sbn_surgery.study import study as run_study
    from sbn_surgery.train import TrainingInterrupted

    main_rank = main_process()
    options = dict(options or {})
    data = options.pop("data", None)
    if data is None:
        raise SbnSurgeryError("study needs --data (e.g. --data digits)")
    _notice(model, options)
    stopped = None
    with progress_bar(json_out, quiet=not main_rank) as progress:
        try:
            result = run_study(model, data, arms=arms.split(",") if arms else None, seeds=seeds,
                               seed=seed, output=output, from_study=from_study,
                               progress=progress, **options)
        except TrainingInterrupted as stop:
            stopped = stop
    if stopped is not None:
        if main_rank:
            err_console.print(f"[yellow]interrupted[/] in {stopped.output}; run the same "
                              "command again to continue the study", highlight=False)
        raise typer.Exit(128 + stopped.signum)  # 130 Ctrl-C, 143 SIGTERM
    if not main_rank:
        return
    if json_out:
        print_json(result.to_json())
        return
    _print_tables(out(False), result)


def _notice(model: str, options: dict) -> None:
    """One line when MODEL's tag names pretrained weights that are not loaded."""
    from sbn_surgery.models import random_weights_notice

    line = random_weights_notice(model, pretrained=bool(options.get("pretrained")),
                                 checkpoint=options.get("checkpoint"))
    if line:
        err_console.print(line, highlight=False, soft_wrap=True)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _print_tables(con, result) -> None:
    from rich.table import Table

    arms = Table(title=f"{len(result.seeds)} seeds, {result.epochs} epochs: last-epoch val")
    for col in ("arm", "top-1 %", "std", "loss", "std", "img/s", "step x", "rms growth"):
        arms.add_column(col, justify="left" if col == "arm" else "right")
    for a in result.arms:
        arms.add_row(a["name"], _pct(a["top1_mean"]), _pct(a["top1_std"]),
                     f"{a['loss_mean']:.4f}", "-" if a["loss_std"] is None else
                     f"{a['loss_std']:.4f}", f"{a['images_per_s']:.0f}",
                     "-" if a["step_ratio"] is None else f"{a['step_ratio']:.2f}",
                     "-" if a["rms_growth"] is None else f"{a['rms_growth']:.3g}")
    con.print(arms)
    diffs = Table(title="top-1 against none (paired, 95 % t-interval over seeds)")
    for col in ("arm", "diff pp", "95 % interval", "verdict"):
        diffs.add_column(col, justify="right" if col in ("diff pp",) else "left")
    for d in result.differences:
        lo, hi = d["ci95"]
        diffs.add_row(d["arm"], f"{100 * d['mean']:+.2f}", f"[{100 * lo:+.2f}, {100 * hi:+.2f}]",
                      d["verdict"])
    con.print(diffs)
    if result.features_plot:
        _print_features(con, result)
    con.print(f"runs in {result.output}; plots {result.plot}"
              + (f", {result.features_plot}" if result.features_plot else ""), highlight=False)


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"


def _diff(d: Optional[dict]) -> str:
    """A paired difference and, on the next line, its 95 % interval."""
    if not d:
        return "-"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.2g}\n[{lo:+.2g}, {hi:+.2g}]"


def _print_features(con, result) -> None:
    from rich.table import Table

    table = Table(title=f"feature maps at the SBN sites after epoch {result.epochs} "
                  f"({result.feature_images} val images); vs none: paired, 95 % t-interval; "
                  "RMS and more in --json")
    for col in ("arm", "max |x|", "vs none", "entropy", "vs none"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    diffs = {d["arm"]: d["features"] for d in result.differences}
    for a in result.arms:
        f, d = a["features"], diffs.get(a["name"]) or {}
        table.add_row(a["name"], _num(f["max_abs"]), _diff(d.get("max_abs")),
                      _num(f["spectral_entropy"]), _diff(d.get("spectral_entropy")))
    con.print(table)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Train")(study)
