"""Forward+backward time of SpectralBatchNorm2d (each mode and path) against nn.BatchNorm2d.

Shapes: N=32 at ResNet-50's four stage shapes for a 224x224 input (--input-size 128: 256x32x32,
512x16x16, 1024x8x8, 2048x4x4), or --sizes: square maps of those sides, with the channel count of
the nearest stage. Prints one JSON object with medians of repeats and the ratio
to BatchNorm for each case (measured in the same run, interleaved): wall-clock, and on CPU also
process CPU time, which other load on a shared machine distorts less. Cases: channel mode
(auto = closed form, fft) and frequency mode (fft, matmul, auto); --stats picks one mode.

    python benchmarks/layer.py [--stats channel|frequency|all] [--input-size 224] [--sizes 4,7,14]
        [--batch 32]
        [--repeats 15] [--threads N] [--device cpu|cuda]

On CPU these tensors (up to 100 MB) are each a fresh mmap for glibc's malloc, so every new
tensor page-faults, and that cost, which varies with what ran before, can dominate a layer this
cheap: the same 512x28x28 case measured 1.02x alone and 1.3-1.5x with the FFT cases interleaved.
For figures that measure the arithmetic, keep freed memory in the heap:

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/layer.py

(the JSON records these settings under "malloc").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from sbn_surgery import SpectralBatchNorm2d

STAGE_CHANNELS_AND_STRIDES = [(256, 4), (512, 8), (1024, 16), (2048, 32)]
CASES = {"channel": [("channel", "auto"), ("channel", "fft")],
         "frequency": [("frequency", "fft"), ("frequency", "matmul"), ("frequency", "auto")]}


def _shapes(sizes: str, input_size: int) -> list[tuple[int, int, int]]:
    stages = [(c, input_size // s, input_size // s) for c, s in STAGE_CHANNELS_AND_STRIDES]
    if not sizes:
        return stages
    out = []
    for side in (int(s) for s in sizes.split(",")):
        c = min(stages, key=lambda shape: abs(shape[1] - side))[0]
        out.append((c, side, side))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward+backward."""
    x.grad = None
    t0, c0 = time.perf_counter(), time.process_time()
    layer(x).backward(g)
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stats", default="all", choices=["channel", "frequency", "all"])
    ap.add_argument("--input-size", type=int, default=224,
                    help="ResNet-50 input side whose stage shapes are measured (224: 56..7)")
    ap.add_argument("--sizes", default="", help="comma-separated map sides (default: the stages')")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    cases = [case for mode, cs in CASES.items() if args.stats in (mode, "all") for case in cs]
    for c, h, w in _shapes(args.sizes, args.input_size):
        x = torch.randn(args.batch, c, h, w, device=args.device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        g = torch.randn_like(x)
        layers = {"bn": nn.BatchNorm2d(c).to(args.device)}
        for stats, impl in cases:
            layers[f"{stats}/{impl}"] = SpectralBatchNorm2d(c, stats=stats, impl=impl).to(args.device)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in layers}
        for layer in layers.values():
            for _ in range(args.warmup):
                _step(layer, x, g, args.device)
        for _ in range(args.repeats):  # interleaved, so drift hits every case alike
            for name, layer in layers.items():
                times[name].append(_step(layer, x, g, args.device))
        med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
        cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
        for name in layers:
            if name == "bn":
                continue
            row = {
                "shape": [args.batch, c, h, w],
                "case": name,
                "median_ms": round(med[name] * 1e3, 3),
                "bn_median_ms": round(med["bn"] * 1e3, 3),
                "ratio_to_bn": round(med[name] / med["bn"], 3),
            }
            if args.device == "cpu":
                row["cpu_ratio_to_bn"] = round(cpu[name] / cpu["bn"], 3)
            results.append(row)
        del x, g, layers
    def worst(case, key="ratio_to_bn"):
        ratios = [r[key] for r in results if r["case"] == case and key in r]
        return max(ratios) if ratios else None

    print(json.dumps({
        "benchmark": "layer_forward_backward",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "repeats": args.repeats,
        "channels_last": args.channels_last,
        "malloc": {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                   if k in os.environ},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "channel_auto_max_ratio": worst("channel/auto"),
        "frequency_auto_max_ratio": worst("frequency/auto"),
        "frequency_auto_max_cpu_ratio": worst("frequency/auto", "cpu_ratio_to_bn"),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
