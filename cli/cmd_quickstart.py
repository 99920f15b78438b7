"""`sbn-surgery quickstart`: convert, fine-tune, export and check parity in under a minute on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import out, print_json, progress_bar

ORDER = 5


def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), "--output", "-o", help="Directory for "
                                "the checkpoints, metrics, curves and model.onnx (replaced if it "
                                "holds an earlier quickstart)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The whole tool in under a minute on 2 idle CPU cores, offline: put SBN into resnet10t
    (recipe resnet), fine-tune it on scikit-learn's digits, export ONNX (fold mode) and check
    parity with onnxruntime.

    [bold]Examples[/bold]

      sbn-surgery quickstart

      sbn-surgery quickstart --output runs/qs --json
    """
    from sbn_surgery.quickstart import quickstart as run

    with progress_bar(json_out) as progress:
        r = run(output, progress=progress)
    if json_out:
        print_json(r.to_json())
        return
    table = Table(title=f"quickstart: {r.model} + SBN (recipe {r.recipe}) on {r.data}")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("time", justify="right")
    fit = r.seconds["convert+finetune"]
    exp = r.seconds["export+parity"]
    maps = ", ".join(sorted({f"{h}x{w}" for h, w in r.sbn_map_sizes}))
    table.add_row("convert", f"{r.sbn_layers} SBN layers inserted ({maps} feature maps)", "")
    table.add_row("fine-tune", f"{r.epochs} epochs: val top-1 {100 * r.val_top1:.1f} %, val loss "
                  f"{r.val_loss:.3f}, {r.images_per_s:.0f} images/s", f"{fit:.0f} s")
    table.add_row("export", f"ONNX, {r.export_mode} mode, {r.onnx_bytes / 1e6:.1f} MB", "")
    verdict = "[green]passed[/]" if r.parity_passed else "[red]FAILED[/]"
    table.add_row("parity", f"{verdict}: max rel err {r.parity_max_rel_err:.1e}, top-1 agreement "
                  f"{100 * r.parity_top1_agreement:.0f} %", f"{exp:.0f} s")
    table.add_row("files", f"{r.checkpoint}\n{r.onnx}\n{r.output}/curves.png", "")
    con = out(json_out)
    con.print(table)
    con.print("Next: sbn-surgery finetune resnet50 --recipe resnet --data DIR  (see --help)",
              highlight=False)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Start here")(quickstart)
