"""`sbn-surgery predict`, `validate` and `quantize`: serving an exported file.

``predict`` imports neither torch nor timm (only ``sbn_surgery.serving``: onnxruntime, numpy,
Pillow); ``validate`` and ``quantize`` import torch only for a data source or a checkpoint that
needs it. Library imports happen inside the commands, so that ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import out, print_json, progress_bar

ORDER = 45
PANEL = "Deploy"

JSON = typer.Option(False, "--json", help="Print one JSON object.")
THREADS = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads (default: "
                       "onnxruntime's choice).")
DATA = typer.Option(..., "--data", "-d", help="Labelled images, as finetune takes them: digits, "
                    "fashion-mnist, synthetic, a folder with train/ and val/ (one sub-folder per "
                    "class), or with --dataset the root of one of timm's data sets.")
SUBSET = typer.Option(None, "--subset", min=1, help="The --subset finetune used: N training "
                      "images and N/5 validation images, the same ones.")
DATASET = typer.Option(None, "--dataset", metavar="KIND", help="timm's data set name: wds/NAME, hfds/NAME, tar, "
                       "folder (as finetune takes it).")
TRAIN_SPLIT = typer.Option(None, "--train-split", metavar="SPLIT", help="With --dataset: timm's training split.")
VAL_SPLIT = typer.Option(None, "--val-split", metavar="SPLIT", help="With --dataset: timm's validation split.")
BATCH = typer.Option(64, "--batch-size", "-b", min=1, metavar="N", help="Images per onnxruntime run.")


def _spec(data, subset, dataset, train_split, val_split):
    from sbn_surgery.accuracy import DataSpec

    return DataSpec(str(data), subset, dataset, train_split, val_split)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def predict(
    model: Path = typer.Argument(..., help="An ONNX file written by `sbn-surgery export` (its "
                                 "metadata holds the preprocessing and class names)."),
    images: list[Path] = typer.Argument(..., help="Image files, or folders searched for them."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, metavar="K", help="Classes shown per image."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, metavar="N", help="Images per run."),
    threads: Optional[int] = THREADS,
    json_out: bool = JSON,
) -> None:
    """The most probable classes of images, by an exported file (no torch needed).

    Each image is preprocessed as the file's metadata says (timm's eval transform: resize,
    center crop, normalize) and run in batches with onnxruntime; the table gives each image's
    top-k class names and probabilities.

    [bold]Examples[/bold]

      sbn-surgery predict r18.onnx photo.jpg

      sbn-surgery predict r18.onnx photos/ --top-k 3 --json
    """
    from sbn_surgery.serving import predict as run_predict

    with progress_bar(json_out) as progress:
        result = run_predict(model, images, k=top_k, batch_size=batch_size, threads=threads,
                             progress=progress)
    if json_out:
        print_json(result.to_json())
        return
    table = Table(title=f"{escape(str(model))}: top-{top_k}")
    table.add_column("image", overflow="fold")  # a long path wraps rather than being cut
    table.add_column("class", overflow="fold")
    for col in ("index", "probability"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in result.predictions:
        for j, (i, name, prob) in enumerate(zip(p.indices, p.classes, p.probs)):
            table.add_row(escape(p.image) if j == 0 else "", escape(name), str(i),
                          f"{100 * prob:.1f} %", end_section=j == len(p.indices) - 1)
    out(False).print(table)


def validate(
    model: Path = typer.Argument(..., help="An ONNX file written by `sbn-surgery export`."),
    data: str = DATA,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", metavar="CKPT", help="The converted "
                                              "checkpoint the file was exported from: also its "
                                              "PyTorch accuracy on the same inputs."),
    subset: Optional[int] = SUBSET,
    dataset: Optional[str] = DATASET,
    val_split: Optional[str] = VAL_SPLIT,
    batch_size: int = BATCH,
    threads: Optional[int] = THREADS,
    json_out: bool = JSON,
) -> None:
    """Top-1 and top-5 of an exported file on the validation split of a data set.

    The images are preprocessed as the file's metadata says, the way finetune's validation
    did, so the top-1 is the one fine-tuning reported for the exported checkpoint (with the
    same --subset). --checkpoint adds the PyTorch model's accuracy on the same inputs and the
    top-1 agreement.

    [bold]Examples[/bold]

      sbn-surgery validate r18.onnx --data digits

      sbn-surgery validate r18.onnx -d fashion-mnist --subset 5000

      sbn-surgery validate r18.onnx -d digits -c runs/r18/best.safetensors
    """
    from sbn_surgery.accuracy import validate_onnx

    with progress_bar(json_out) as progress:
        result = validate_onnx(model, _spec(data, subset, dataset, None, val_split),
                               checkpoint=checkpoint, batch_size=batch_size, threads=threads,
                               progress=progress)
    if json_out:
        print_json(result.to_json())
        return
    _print_validate(result)


def _print_validate(result) -> None:
    con = out(False)
    rep = result.report
    table = Table(title=f"{escape(rep.data)}: {rep.images} images")
    for col in ("model", "top-1", "top-5", "images/s", "top-1 agreement"):
        table.add_column(col, justify="left" if col == "model" else "right")
    labels = {"onnx": result.onnx, "pytorch": f"{result.checkpoint} (PyTorch)"}
    for s in rep.scores:
        table.add_row(escape(labels[s.name]), _pct(s.top1), _pct(s.top5), f"{s.images_per_s:.0f}",
                      _pct(s.agreement))
    con.print(table)
    cfg = result.data_config
    con.print(f"preprocessing (from the file): {'x'.join(map(str, cfg['input_size']))}, "
              f"{cfg['interpolation']}, crop_pct {cfg['crop_pct']}, {cfg['crop_mode']}")
    if result.checkpoint is not None:
        diff = 100 * (rep["onnx"].top1 - rep["pytorch"].top1)
        con.print(f"top-1 difference (file - PyTorch): [bold]{diff:+.2f}[/] points")
    for note in result.notes:
        con.print(f"[yellow]note:[/] {escape(note)}")


def quantize(
    model: Path = typer.Argument(..., help="A float ONNX file written by `sbn-surgery export`."),
    data: str = DATA,
    output: Path = typer.Option(..., "--output", "-o", help="The int8 file to write (.onnx)."),
    calibration_images: int = typer.Option(256, "--calibration-images", min=1, metavar="N", help="Training "
                                           "images the activation ranges are calibrated on."),
    max_top1_drop: float = typer.Option(1.0, "--max-top1-drop", min=0.0, metavar="POINTS", help="The most top-1 "
                                        "points the int8 file may lose against the float file."),
    min_agreement: float = typer.Option(0.98, "--min-agreement", min=0.0, max=1.0,
                                        metavar="FRACTION", help="The "
                                        "least share of validation images on whose top-1 class "
                                        "the int8 and float files agree (0-1)."),
    subset: Optional[int] = SUBSET,
    dataset: Optional[str] = DATASET,
    train_split: Optional[str] = TRAIN_SPLIT,
    val_split: Optional[str] = VAL_SPLIT,
    batch_size: int = BATCH,
    threads: Optional[int] = THREADS,
    json_out: bool = JSON,
) -> None:
    """Quantize an exported file to int8, and prove its accuracy against the float file.

    onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations),
    calibrated on training images through the file's own preprocessing; then the int8 and float
    files run on the validation split. A file that misses --max-top1-drop or --min-agreement is
    kept as NAME.int8-failed.onnx and the command exits with code 2.

    [bold]Examples[/bold]

      sbn-surgery quantize r18.onnx --data digits -o r18.int8.onnx

      sbn-surgery bench r18.int8.onnx r18.onnx --batch 16
    """
    from sbn_surgery.accuracy import QuantizeFailed, quantize_onnx

    spec = _spec(data, subset, dataset, train_split, val_split)
    try:
        with progress_bar(json_out) as progress:
            result = quantize_onnx(model, spec, output, calibration_images=calibration_images,
                                   max_top1_drop=max_top1_drop, min_agreement=min_agreement,
                                   batch_size=batch_size, threads=threads, progress=progress)
    except QuantizeFailed as exc:  # the file is kept: show what failed, then exit 2
        _print_quantize(exc.report, json_out, exc.kept)
        raise
    _print_quantize(result, json_out)


def _print_quantize(result, json_out: bool, kept: Optional[Path] = None) -> None:
    if json_out:
        print_json({**result.to_json(), "kept": None if kept is None else str(kept)})
        return
    con = out(False)
    rep = result.report
    table = Table(title=f"int8 against float on {escape(rep.data)}: {rep.images} images")
    for col in ("file", "top-1", "top-5", "images/s", "top-1 agreement"):
        table.add_column(col, justify="left" if col == "file" else "right")
    names = {"float": result.onnx, "int8": str(kept or result.output)}
    for s in rep.scores:
        table.add_row(escape(names[s.name]), _pct(s.top1), _pct(s.top5), f"{s.images_per_s:.0f}",
                      _pct(s.agreement))
    con.print(table)
    for prefix, why in result.quantized.float_nodes.items():
        con.print(f"kept in float: {escape(prefix)}... ({escape(why)})")
    verdict = "[bold green]PASSED[/]" if result.passed else "[bold red]FAILED[/]"
    con.print(f"int8 check {verdict}: top-1 drop {result.top1_drop:.2f} points (allowed "
              f"{result.max_top1_drop:g}), agreement {_pct(rep['int8'].agreement)} (required "
              f"{100 * result.min_agreement:g} %)")
    if result.passed:
        con.print(f"wrote [cyan]{escape(result.output)}[/] (calibrated on "
                  f"{result.quantized.calibration_images} training images)")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL)(predict)
    app.command(rich_help_panel=PANEL)(validate)
    app.command(rich_help_panel=PANEL)(quantize)
