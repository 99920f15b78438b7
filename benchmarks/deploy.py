"""onnxruntime CPU latency of a fine-tuned SBN model's int8 file against its float file, and
against the int8 file of the same model without SBN; or (``--resnet50``) of ResNet-50 with the
``resnet`` recipe at 224x224 against the plain ResNet-50, in float (fold) and in int8.

From a converted checkpoint (e.g. ``runs/r18-fmnist/best.safetensors``) this writes, in
``--out-dir``: the float file (``export``, fold mode), its int8 file (``quantize``, calibrated on
``--data``'s training images and checked on its validation split), the same model with its SBN
layers stripped exported and quantized the same way (``plain.onnx``, ``plain.int8.onnx``; its
accuracy check is against its own float file). Then, at each batch size, two interleaved
``bench`` runs: int8 and float side by side, and int8 SBN against int8 without SBN. Two clocks:
``wall`` (onnxruntime's default threads: what a user sees, noisy on a busy machine) and ``cpu``
(process CPU time per run with one intra-op thread: the work a run costs). Targets: int8/float
<= 0.6, int8 SBN / int8 plain <= 1.05. Prints one JSON object (load averages included).

    python benchmarks/deploy.py runs/r18-fmnist/best.safetensors --data fashion-mnist \\
        --subset 5000 [--batches 1 16] [--repeats 40] [--out-dir DIR]
    python benchmarks/deploy.py --resnet50 [--batches 1 8] [--repeats 40] [--out-dir DIR]

``--resnet50`` builds the model of ``benchmarks/export.py`` (random weights, trained-like norms,
9 channel-mode SBN layers) and calibrates both int8 files on the same 16 random images (no data
set has its 1000 classes here; latency does not depend on it). Its targets: fold / plain <=
1.03, int8 SBN / int8 plain <= 1.05.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
from pathlib import Path


def _files(args, out: Path) -> dict[str, Path]:
    """Export and quantize the SBN model and the plain one (files already there are kept)."""
    from sbn_surgery import export_onnx, strip_sbn
    from sbn_surgery.accuracy import DataSpec, quantize_onnx
    from sbn_surgery.checkpoint import load_converted

    spec = DataSpec(args.data, args.subset)
    model = load_converted(args.checkpoint)
    files = {"float": out / "sbn.onnx", "int8": out / "sbn.int8.onnx",
             "plain": out / "plain.onnx", "plain_int8": out / "plain.int8.onnx"}
    checks = {}
    # without its SBN layers the fine-tuned network computes another function, with many
    # near-ties: only its latency matters, so its int8 check is reported, not enforced
    for net, f, q, bounds in ((model, files["float"], files["int8"], {}),
                              (strip_sbn(copy.deepcopy(model)), files["plain"], files["plain_int8"],
                               {"max_top1_drop": 100.0, "min_agreement": 0.0})):
        if not f.exists():
            export_onnx(net, f)
        if not q.exists():
            report = quantize_onnx(f, spec, q, calibration_images=args.calibration_images,
                                   **bounds)
            checks[q.name] = {"top1_drop_points": report.top1_drop,
                              "top1_agreement": report.report["int8"].agreement}
    return files, checks


def _resnet50_files(out: Path) -> dict[str, Path]:
    """Float and int8 files of ResNet-50 with SBN (fold) and without (files there are kept)."""
    import sys

    import numpy as np

    from sbn_surgery import export_onnx
    from sbn_surgery.serving.quantize import quantize_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export import build  # benchmarks/export.py's ResNet-50

    files = {"float": out / "r50-fold.onnx", "int8": out / "r50-fold.int8.onnx",
             "plain": out / "r50-plain.onnx", "plain_int8": out / "r50-plain.int8.onnx"}
    size = (3, 224, 224)
    if not (files["float"].exists() and files["plain"].exists()):
        model, plain, _ = build(size)
        export_onnx(model, files["float"], input_size=size)
        export_onnx(plain, files["plain"], input_size=size)
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((4, *size)).astype(np.float32) for _ in range(4)]
    for f, q in ((files["float"], files["int8"]), (files["plain"], files["plain_int8"])):
        if not q.exists():
            quantize_file(f, q, iter(images), 16)
    return files


def _ratio(files: dict[str, Path], first: str, second: str, batch: int, repeats: int,
           threads, clock: str) -> dict:
    """One interleaved bench run of two files: both medians and their ratio."""
    from sbn_surgery.parity import bench

    report = bench([files[first], files[second]], batch=batch, repeats=repeats, threads=threads,
                   clock=clock)
    a, b = report.files
    return {f"{first}_ms": a.latency_ms, f"{second}_ms": b.latency_ms,
            "ratio": a.latency_ms / b.latency_ms}


def _pairs(files: dict[str, Path], batch: int, repeats: int, resnet50: bool) -> dict:
    """Per clock, one run per pair: int8 vs float, int8 SBN vs int8 plain (and for ResNet-50
    fold vs plain); each ratio is within its own run."""
    row = {}
    for clock, threads in (("wall", None), ("cpu", 1)):
        pairs = [("int8", "float"), ("int8", "plain_int8")] + ([("float", "plain")] if resnet50 else [])
        row[clock] = {f"{a}_over_{b}": _ratio(files, a, b, batch, repeats, threads, clock)
                      for a, b in pairs}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a converted (fine-tuned) checkpoint")
    ap.add_argument("--resnet50", action="store_true", help="ResNet-50 with the resnet recipe")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out-dir", default=None, help="keep the ONNX files here")
    args = ap.parse_args()

    import onnxruntime

    if args.checkpoint is None and not args.resnet50:
        ap.error("give a checkpoint, or --resnet50")
    load_start = os.getloadavg()
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="sbn-deploy-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.resnet50:
        files, checks = _resnet50_files(out), {}
    else:
        files, checks = _files(args, out)
    results = [{"batch": b, **_pairs(files, b, args.repeats, args.resnet50)} for b in args.batches]
    targets = {"int8_over_float": 0.6, "int8_over_plain_int8": 1.05}
    if args.resnet50:
        targets["float_over_plain"] = 1.03
    print(json.dumps({
        "checkpoint": "resnet50 (benchmarks/export.py)" if args.resnet50 else args.checkpoint,
        "data": None if args.resnet50 else args.data, "subset": args.subset,
        "files": {k: str(v) for k, v in files.items()}, "quantize_checks": checks,
        "repeats": args.repeats, "results": results, "targets": targets,
        "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
