"""onnxruntime CPU latency of a fine-tuned SBN model's int8 file against its float file, and
against the int8 file of the same model without SBN.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a converted (fine-tuned) checkpoint")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out-dir", default=None, help="keep the ONNX files here")
    args = ap.parse_args()

    import onnxruntime

    from sbn_surgery.parity import bench

    load_start = os.getloadavg()
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="sbn-deploy-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    files, checks = _files(args, out)
    results = []
    for batch in args.batches:
        row = {"batch": batch}
        for clock, threads in (("wall", None), ("cpu", 1)):
            pair = bench([files["int8"], files["float"]], batch=batch, repeats=args.repeats,
                         threads=threads, clock=clock)
            sbn = bench([files["int8"], files["plain_int8"]], batch=batch, repeats=args.repeats,
                        threads=threads, clock=clock)
            row[clock] = {"int8_ms": pair.files[0].latency_ms, "float_ms": pair.files[1].latency_ms,
                          "int8_over_float": 1 / pair.files[1].ratio,
                          "plain_int8_ms": sbn.files[1].latency_ms,
                          "int8_sbn_over_int8_plain": 1 / sbn.files[1].ratio}
        results.append(row)
    print(json.dumps({
        "checkpoint": args.checkpoint, "data": args.data, "subset": args.subset,
        "files": {k: str(v) for k, v in files.items()}, "quantize_checks": checks,
        "repeats": args.repeats, "results": results,
        "targets": {"int8_over_float": 0.6, "int8_sbn_over_int8_plain": 1.05},
        "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
