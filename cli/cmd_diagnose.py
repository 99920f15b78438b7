"""`sbn-surgery diagnose`: feature-map norms and spectra per depth, with and without BN and SBN."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from .cmd_convert import CHECKPOINT_KEY_HELP, PRETRAINED_HELP
from .common import FORCE_HELP, err_console, out, parse_kv, print_json, progress_bar

ORDER = 40


def _fmt(v: Optional[float], style: str = "") -> str:
    """3 significant digits in at most 6 characters: 0.123, 12.3, 1.23e4."""
    if v is None:
        return "-"
    if v == 0 or 0.01 <= abs(v) < 1000:
        text = f"{v:.3g}"
    else:
        mant, exp = f"{v:.2e}".split("e")
        text = f"{mant}e{int(exp)}"
    return f"[{style}]{text}[/]" if style else text


def _size(rep) -> str:
    return "x".join(str(s) for s in rep.input_size[1:]) if rep.input_size else "?"


def _single_table(rep) -> Table:
    table = Table(title=f"{rep.model} \u00b7 {rep.label} \u00b7 input {_size(rep)} \u00b7 "
                        f"{rep.samples} samples \u00b7 norms on {rep.norm_stats} statistics",
                  box=box.SIMPLE_HEAD)
    table.add_column("module", style="cyan")
    table.add_column("C\u00d7H\u00d7W", justify="right", style="dim")
    table.add_column("RMS", justify="right")
    table.add_column("max |x|", justify="right")
    table.add_column("top freq\nshare", justify="right")
    table.add_column("spectral\nentropy", justify="right")
    for r in rep.layers:
        table.add_row(r.module, "\u00d7".join(str(s) for s in r.shape), _fmt(r.rms, "bold"),
                      _fmt(r.max_abs), _fmt(r.top_freq_share), _fmt(r.spectral_entropy))
    return table


def _compare_table(reports) -> Table:
    first = reports[0]
    recipe = next((r.recipe for r in reports if r.recipe), "")
    table = Table(title=f"{first.model} \u00b7 input {_size(first)} \u00b7 {first.samples} samples"
                        f" \u00b7 norms on {first.norm_stats} statistics"
                        + (f" \u00b7 SBN: {recipe}" if recipe else ""),
                  caption="RMS of each block output; H: its spectral entropy (1 = flat "
                          "spectrum); growth = RMS of the last block / the first. Top-frequency "
                          "shares and max |x|: --json.",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("module", style="cyan", no_wrap=True)

    def head(kind: str, variant: str) -> str:  # "no-bn+sbn" -> "no-bn\n+sbn": narrow columns
        lines = [kind] + variant.replace("+", "\n+").split("\n")
        return "\n".join(lines + [""] * (3 - len(lines)))

    for rep in reports:
        table.add_column(head("RMS", rep.variant), justify="right")
    for rep in reports:
        table.add_column(head("H", rep.variant), justify="right", style="dim")
    by_module = [{r.module: r for r in rep.layers} for rep in reports]
    for r in first.layers:
        rows = [m.get(r.module) for m in by_module]
        table.add_row(r.module, *[_fmt(x.rms if x else None, "bold") for x in rows],
                      *[_fmt(x.spectral_entropy if x else None) for x in rows])
    table.add_section()
    table.add_row("growth", *[_fmt(rep.growth(), "bold yellow") for rep in reports],
                  *["" for _ in reports])
    return table


def _growth_line(rep) -> str:
    blocks = rep.blocks()
    g = rep.growth()
    if g is None:
        return "fewer than two blocks: no growth figure"
    return (f"RMS grows [bold]\u00d7{_fmt(g)}[/] from the first block ({blocks[0].module}, "
            f"{_fmt(blocks[0].rms)}) to the last ({blocks[-1].module}, {_fmt(blocks[-1].rms)}).")


def diagnose(
    model: str = typer.Argument(..., help="A timm model name (e.g. resnet50), or a converted "
                                "checkpoint (.safetensors) from convert/finetune."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Trained weights "
                                              "for MODEL (.safetensors, .pth/.pt/.pth.tar read with "
                                              "weights_only=True, a snapshot directory, "
                                              "hf-hub:ORG/NAME), or a converted checkpoint. "
                                              "Without it: timm's random initialization."),
    checkpoint_key: Optional[str] = typer.Option(None, "--checkpoint-key", help=CHECKPOINT_KEY_HELP),
    pretrained: bool = typer.Option(False, "--pretrained", help=PRETRAINED_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Insert SBN with this "
                                         "recipe (shipped name or YAML path) before measuring. "
                                         "With --compare the default is the shipped recipe that "
                                         "fits MODEL."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    remove_bn: bool = typer.Option(False, "--remove-bn", help="Make every BatchNorm the identity "
                                   "(after the recipe; SBN layers stay): the paper's 'without BN'."),
    compare: bool = typer.Option(False, "--compare", help="Measure the four variants BN, BN + "
                                 "SBN, no BN, no BN + SBN on the same images: one table, one plot."),
    data: str = typer.Option("synthetic", "--data", "-d", help="Images: synthetic (random normal), "
                             "digits, fashion-mnist, or an ImageFolder directory."),
    input_size: Optional[tuple[int, int, int]] = typer.Option(
        None, "--input-size", metavar="C H W", help="Input size. Default: the model's timm input "
        "size (a converted checkpoint's own size)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=2, help="Images per batch (batch "
                                   "statistics need at least 2)."),
    batches: int = typer.Option(1, "--batches", min=1, help="Number of batches; figures pool them."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialization (without a "
                             "checkpoint) and of the synthetic images."),
    norm_stats: str = typer.Option("batch", "--norm-stats", help="batch: norm layers use batch "
                                   "statistics, as in training (the paper's setting; at init, "
                                   "eval-mode BN is nearly the identity); running: eval mode."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier size "
                                              "(timm's num_classes), to match a checkpoint."),
    model_kwargs: Optional[list[str]] = typer.Option(None, "--model-kwargs", help="Extra timm "
                                                     "create_model arguments as key=value; repeat."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of RMS against depth "
                                        "(log scale), one line per variant."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure feature maps per residual block: RMS, max |x|, top-frequency share, entropy.

    Without BN, feature maps explode with depth at initialization (the paper's observation).

    Compare where SBN stops it, and how it spreads energy over frequencies. Runs on a copy.

    [bold]Examples[/bold]

      sbn-surgery diagnose resnet50 --input-size 3 64 64 --remove-bn

      sbn-surgery diagnose resnet50 --input-size 3 64 64 --compare --plot rms.png

      sbn-surgery diagnose resnet50 --recipe resnet --remove-bn --json

      sbn-surgery diagnose r50-sbn.safetensors --data digits --norm-stats running
    """
    from sbn_surgery.errors import SbnSurgeryError
    from sbn_surgery.models import input_size_of

    if norm_stats not in ("batch", "running"):
        raise SbnSurgeryError(f"--norm-stats must be 'batch' or 'running'; got {norm_stats!r}")
    con = out(json_out)
    net = _load(model, checkpoint, checkpoint_key, num_classes, model_kwargs, seed, pretrained)
    meta = getattr(net, "sbn_meta", None) or {}
    name = str(meta.get("model_name") or model)
    if input_size is None:
        input_size = tuple(meta["input_size"]) if meta.get("input_size") else input_size_of(net)
    images = _load_images(net, data, input_size, batch_size, batches, seed)
    if compare and remove_bn:
        con.print("[yellow]--remove-bn is implied by --compare, which shows both settings.[/]")
    reports = _measure(net, images, compare, dict(
        recipe=recipe, norm_stats=norm_stats, input_size=input_size, model_name=name,
        force=force), remove_bn, json_out)
    if plot is not None:
        _plot(reports, plot, checkpoint, bool(meta), pretrained)
    _render(reports, con, name, compare, json_out, plot)


def _plot(reports: list, plot: Path, checkpoint: Optional[Path], converted: bool,
          pretrained: bool = False) -> None:
    from sbn_surgery.diagnose import plot_rms

    weights = f"(weights {checkpoint.name})" if checkpoint is not None else \
        ("(converted checkpoint)" if converted else
         "(pretrained weights)" if pretrained else "at initialization")
    plot_rms(reports, plot, weights=weights)


def _load(model: str, checkpoint, checkpoint_key, num_classes, model_kwargs, seed: int,
          pretrained: bool):
    import torch

    from sbn_surgery.diagnose import load_model
    from sbn_surgery.models import random_weights_notice

    torch.manual_seed(seed)  # the initialization, when no weights are given
    net = load_model(model, checkpoint=checkpoint, checkpoint_key=checkpoint_key,
                     num_classes=num_classes, model_kwargs=parse_kv(model_kwargs, "--model-kwargs"),
                     pretrained=pretrained)
    line = None if getattr(net, "sbn_meta", None) else random_weights_notice(
        model, pretrained=pretrained, checkpoint=checkpoint)
    if line:
        err_console.print(line, highlight=False, soft_wrap=True)
    return net


def _measure(net, images, compare: bool, options: dict, remove_bn: bool, json_out: bool) -> list:
    """The reports of the four variants (``compare``) or of the one asked for."""
    from sbn_surgery.diagnose import compare as run_compare
    from sbn_surgery.diagnose import diagnose_variant

    with progress_bar(json_out) as progress:
        if compare:
            return run_compare(net, images, progress=progress, **options)
        return [diagnose_variant(net, images, remove_bn=remove_bn, progress=progress, **options)]


def _render(reports: list, con, name: str, compare: bool, json_out: bool,
            plot: Optional[Path]) -> None:
    if json_out:  # one object on stdout, and no table on stderr either (notes are in it)
        if compare:
            print_json({"model": name, "variants": [r.to_json() for r in reports]})
        else:
            print_json(reports[0].to_json())
        return
    if compare:
        con.print(_compare_table(reports))
    else:
        con.print(_single_table(reports[0]))
        con.print(_growth_line(reports[0]))
    for rep in reports:
        for note in rep.notes:
            con.print(f"[yellow]{rep.label}: {note}[/]")
    if plot is not None:
        con.print(f"Plot written to [cyan]{plot}[/].")


def _load_images(net, data: str, input_size, batch_size: int, batches: int, seed: int):
    """Synthetic random normal images, or preprocessed images from a data source."""
    if data == "synthetic":
        from sbn_surgery.surgery import synthetic_batches

        return synthetic_batches(tuple(input_size), batch_size, batches, seed=seed)
    from sbn_surgery.data import calibration_batches, data_config_for

    return calibration_batches(data, data_config_for(net, input_size), batch_size, batches)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Understand")(diagnose)
