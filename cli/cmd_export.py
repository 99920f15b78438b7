"""`sbn-surgery export`, `parity` and `bench`: ONNX files, their parity with PyTorch, their speed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from sbn_surgery.onnx_io import DEFAULT_OPSET, MIN_OPSET

from .common import out, print_json, progress_bar

ORDER = 40

PANEL = "Export"
MODE_HELP = (
    "How SBN is written. fold (default, deployment): channel mode as elementwise ops, its scale "
    "folded into the BatchNorm, Linear or convolution in front where that is exact, any spatial "
    "size; frequency mode as its per-channel circular filter in matmul form. matmul: the 2-D DFT as constant matrices in "
    "real arithmetic, for runtimes without a DFT kernel (onnxruntime CUDA, TensorRT); FIXED "
    "spatial size. dft: ONNX DFT nodes, the faithful form; slow on CPU."
)
DATA_HELP = ("Real images for the parity check besides random ones: digits, fashion-mnist, "
             "synthetic, or an ImageFolder directory (train/, val/).")
RTOL_HELP = ("Parity tolerance on max_rel_err (max |onnx - torch| / max |torch|). Default: sized "
             "by the transform: 1e-5 without one, 1e-5*max(1, sqrt(HW/256)) for matmul, "
             "1e-4*max(1, log2(HW)/12) for dft, HW the largest SBN feature map.")
# options shared by `export` and `parity` (the parity check is the same in both)
RTOL = typer.Option(None, "--rtol", help=RTOL_HELP)
MIN_TOP1 = typer.Option(1.0, "--min-top1", min=0.0, max=1.0, help="Required top-1 agreement (0-1).")
DATA = typer.Option(None, "--data", help=DATA_HELP)
DATA_IMAGES = typer.Option(8, "--data-images", min=2, help="How many real images --data contributes.")
JSON = typer.Option(False, "--json", help="Print one JSON object.")


def _images(data: Optional[str], model, size, count: int):
    if data is None:
        return None
    from sbn_surgery.data import calibration_batches, data_config_for

    cfg = data_config_for(model, size)
    return calibration_batches(data, cfg, count, 1)[0]


def _parity_table(report, title: str) -> Table:
    table = Table(title=title)
    for col in ("inputs", "shape", "max abs err", "max rel err", "top-1 agreement"):
        table.add_column(col, justify="right" if col != "inputs" else "left")
    for c in report.cases:
        if c.error:
            table.add_row(escape(c.source), "x".join(map(str, c.shape)), "-", "-",
                          f"[red]{escape(c.error[:60])}[/]")
            continue
        table.add_row(escape(c.source), "x".join(map(str, c.shape)), f"{c.max_abs_err:.2e}",
                      f"{c.max_rel_err:.2e}", f"{c.top1_agreement:.1%}")
    return table


def _print_parity(report, con, title: str) -> None:
    con.print(_parity_table(report, title))
    for note in report.notes:
        con.print(f"[yellow]note:[/] {escape(note)}")
    verdict = "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]"
    con.print(f"parity {verdict}: {escape(report.describe())}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}"  # a per-layer overview; --json has every digit


def _layer_table(report) -> Table:
    table = Table(title="SBN layers in graph order", caption="relative errors; out: at the "
                  "layer's output, with what came from upstream; own: the layer's output against "
                  "the PyTorch layer run on the input the file gave it (--json adds the error at "
                  "its input); over: own "
                  "error beyond tolerance; starts: the first such layer, where the error starts; absent: "
                  "the graph no longer shows the layer")
    table.add_column("module", overflow="fold")  # wraps long paths rather than cutting them
    table.add_column("stats", no_wrap=True)
    table.add_column("form", no_wrap=True)
    for col in ("out err", "own err"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=6)  # the verdict: never the one cut short
    for layer in report.layers:
        if layer.max_rel_err is None:
            table.add_row(layer.module, layer.stats, layer.form, "-", "-", "[dim]absent[/]")
            continue
        mark = "[green]ok[/]" if layer.passed else ""
        if layer.module == report.first_bad_layer:
            mark = "[bold red]starts[/]"
        elif layer.passed is False:
            mark = "[red]over[/]"
        table.add_row(layer.module, layer.stats, layer.form, _fmt(layer.max_rel_err),
                      _fmt(layer.own_rel_err), mark)
    return table


def export(
    checkpoint: Path = typer.Argument(..., help="A converted checkpoint (.safetensors) from "
                                      "`sbn-surgery convert` or `finetune`."),
    output: Path = typer.Option(..., "--output", "-o", help="The ONNX file to write (.onnx)."),
    mode: str = typer.Option("fold", "--mode", "-m", help=MODE_HELP),
    opset: int = typer.Option(DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET} or later (torch.onnx "
                              f"writes {MIN_OPSET}+; DFT exists from 17)."),
    input_size: Optional[tuple[int, int, int]] = typer.Option(
        None, help="C H W of the exported input. Default: the size the checkpoint was converted "
        "at. Frequency-mode SBN and matmul mode are fixed to the spatial size this gives."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static", help="A symbolic batch "
                                       "axis, or a fixed one (--batch-size)."),
    batch_size: int = typer.Option(1, min=1, help="The batch size of a --static file."),
    dynamic_size: Optional[bool] = typer.Option(
        None, "--dynamic-size/--fixed-size", help="A symbolic spatial size (any H, W). Default: "
        "wherever possible: channel-mode SBN in fold and dft modes, and a model whose exported "
        "graph also matches PyTorch at 32 more pixels each way (else the file gets a fixed "
        "size, with a note). Asking for it with frequency-mode SBN or matmul mode is an error."),
    rtol: Optional[float] = RTOL,
    min_top1: float = MIN_TOP1,
    data: Optional[str] = DATA,
    data_images: int = DATA_IMAGES,
    json_out: bool = JSON,
) -> None:
    """Export a converted checkpoint to one ONNX file and prove parity with PyTorch.

    The file is run with onnxruntime on random inputs (and --data images) at batch 1 and 3 and
    compared with the PyTorch model; a failure exits with code 2 and keeps the file. Each SBN's
    nodes are named SpectralBatchNorm/<module path>/... (visible in Netron); the metadata holds
    the model name, recipe, mode and library version.

    [bold]Examples[/bold]

      sbn-surgery export r18-sbn.safetensors -o r18.onnx

      sbn-surgery export r18-sbn.safetensors -o r18-mm.onnx --mode matmul

      sbn-surgery export r18-sbn.safetensors -o r18-dft.onnx --mode dft --json
    """
    from sbn_surgery.checkpoint import load_converted
    from sbn_surgery import export_onnx
    from sbn_surgery.parity import ParityFailed

    model = load_converted(checkpoint)
    size = input_size or tuple(model.sbn_meta.get("input_size") or ()) or None
    images = _images(data, model, size, data_images)
    try:
        with progress_bar(json_out) as progress:
            result = export_onnx(model, output, mode=mode, opset=opset, input_size=size,
                                 dynamic_batch=dynamic_batch, dynamic_size=dynamic_size,
                                 batch_size=batch_size, images=images, rtol=rtol,
                                 min_top1=min_top1, progress=progress)
    except ParityFailed as exc:  # the file is kept: show what failed, then exit 2
        if json_out:
            print_json({"onnx": str(exc.path), "mode": mode, "opset": opset,
                        "parity": exc.report.summary()})
        else:
            _print_parity(exc.report, out(False), "parity with PyTorch (onnxruntime CPU)")
        raise
    if json_out:
        print_json(result.to_json())
        return
    con = out(False)
    folded = sum(1 for s in result.sites if s.folded_into)
    dims = ("N" if result.dynamic_batch else str(batch_size), str(result.input_size[0]),
            "H" if result.dynamic_size else str(result.input_size[1]),
            "W" if result.dynamic_size else str(result.input_size[2]))
    con.print(f"wrote [cyan]{escape(str(result.path))}[/] ({result.size_bytes / 1e6:.1f} MB): mode "
              f"[bold]{result.mode}[/], opset {result.opset}, input {'x'.join(dims)}, "
              f"{len(result.sites)} SBN layer(s)" + (f", {folded} folded into the layer in front" if folded else ""))
    for note in result.notes:
        con.print(f"[yellow]note:[/] {escape(note)}")
    _print_parity(result.parity, con, "parity with PyTorch (onnxruntime CPU)")


def parity(
    onnx_file: Path = typer.Argument(..., help="An ONNX file written by `sbn-surgery export`."),
    checkpoint: Path = typer.Argument(..., help="The converted checkpoint it was exported from."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also compare every SBN layer's "
                                   "output, in graph order, and show where the error starts."),
    input_size: Optional[tuple[int, int, int]] = typer.Option(
        None, help="C H W to test at (a dynamic-size file runs at any). Default: the export size."),
    rtol: Optional[float] = RTOL,
    min_top1: float = MIN_TOP1,
    data: Optional[str] = DATA,
    data_images: int = DATA_IMAGES,
    json_out: bool = JSON,
) -> None:
    """Check an existing ONNX file against its checkpoint in PyTorch (exit 2 on failure).

    [bold]Examples[/bold]

      sbn-surgery parity r18.onnx r18-sbn.safetensors

      sbn-surgery parity r18-dft.onnx r18-sbn.safetensors --per-layer --json
    """
    from sbn_surgery.checkpoint import load_converted
    from sbn_surgery.onnx_io import read_onnx_metadata
    from sbn_surgery.parity import ParityFailed, check_parity

    model = load_converted(checkpoint)
    size = input_size or tuple(read_onnx_metadata(onnx_file).get("input_size") or ()) or None
    images = _images(data, model, size, data_images)
    report = check_parity(onnx_file, model, images=images, input_size=size, rtol=rtol,
                          min_top1=min_top1, per_layer=per_layer)
    if json_out:
        print_json({"onnx": str(onnx_file), **report.to_json()})
    else:
        con = out(False)
        _print_parity(report, con, f"parity of {escape(str(onnx_file))} with PyTorch")
        if report.layers is not None:
            con.print(_layer_table(report))
    if not report.passed:
        raise ParityFailed(report, onnx_file)


def bench(
    onnx_files: list[Path] = typer.Argument(..., help="The ONNX files to time, side by side; "
                                            "the ratios are to the first unless --against is given."),
    against: Optional[Path] = typer.Option(None, "--against", help="A baseline ONNX file (e.g. "
                                           "the model without SBN) timed on the same input in "
                                           "the same loop; the ratios are latency / its latency."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size."),
    repeats: int = typer.Option(20, min=1, help="Timed runs per file (the median is reported)."),
    warmup: int = typer.Option(3, min=0, help="Untimed runs per file first."),
    threads: Optional[int] = typer.Option(None, min=1, help="onnxruntime intra-op threads "
                                          "(default: onnxruntime's choice)."),
    input_size: Optional[tuple[int, int, int]] = typer.Option(
        None, help="C H W for files with a symbolic size. Default: the export size."),
    cpu_time: bool = typer.Option(False, "--cpu-time", help="Time runs by process CPU time "
                                  "instead of the wall clock: with --threads 1, the cost of a run "
                                  "whatever else the machine is doing."),
    json_out: bool = JSON,
) -> None:
    """Measure onnxruntime CPU latency of files side by side (median of repeats, interleaved).

    [bold]Examples[/bold]

      sbn-surgery bench r18.int8.onnx r18.onnx --batch 16

      sbn-surgery bench r18.onnx --against r18-dft.onnx --batch 8

      sbn-surgery bench r18.onnx --against r18-dft.onnx --threads 1 --cpu-time
    """
    from sbn_surgery.parity import bench as run_bench

    with progress_bar(json_out) as progress:
        report = run_bench(onnx_files, against, batch=batch, repeats=repeats, warmup=warmup,
                           threads=threads, input_size=input_size,
                           clock="cpu" if cpu_time else "wall", progress=progress)
    if json_out:
        print_json(report.to_json())
        return
    con = out(False)
    what = "CPU time" if report.clock == "cpu" else "latency"
    table = Table(title=f"onnxruntime on CPU: {what}, input "
                        f"{'x'.join(map(str, report.input_shape))}, median of {report.repeats}, "
                        "interleaved")
    table.add_column("file")
    table.add_column(f"{what} (ms)", justify="right")
    table.add_column("ratio", justify="right")
    for row in report.files:
        table.add_row(escape(row.onnx), f"{row.latency_ms:.2f}", f"{row.ratio:.3f}")
    con.print(table)
    base = report.against or report.onnx
    if len(report.files) > 1:
        con.print(f"ratios: latency / latency of [bold]{escape(base)}[/]")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel=PANEL)(export)
    app.command(rich_help_panel=PANEL)(parity)
    app.command(rich_help_panel=PANEL)(bench)
