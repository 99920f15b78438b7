"""Train-step time of a timm model without SBN and with it in each statistics mode, same batch.

One step = forward, cross-entropy, backward, SGD step (momentum 0.9). All models are built from
the same seed; the converted ones get SBN where the recipe says, with the recipe's ``stats``
switched to each mode of ``--stats`` (default both: channel and frequency). Steps are interleaved
(plain, channel, frequency, plain, ...) so drift in machine load hits all alike. Prints one JSON
object (nothing else on stdout; the profiler's C++ log lines are kept off stderr) with the median
step times, each mode's ratio to plain (wall-clock, and process CPU time, which other load on a
shared machine distorts less), images/s, and the share of a profiled step's CPU time
spent in the SBN layers (robust to other load on the machine).

    python benchmarks/train_step.py [--model resnet50] [--recipe resnet] [--stats channel,frequency]
        [--batch 16] [--size 128] [--repeats 20] [--device cpu|cuda] [--amp] [--channels-last]
        [--threads N]

SBN on tokens (ViT-S/16, the ``vit`` recipe: 6 layers after mlp.fc2 of blocks 6-11, the class
token multiplied by the layer's gain), against the plain ViT-S on one thread:

    python benchmarks/train_step.py --model vit_small_patch16_224 --recipe vit --stats channel \
        --size 224 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          amp: bool, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with ctx:
        loss = nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _sbn_share(model: nn.Module, opt, x, y, amp: bool, device: torch.device):
    """Share of one profiled SBN-model step's CPU time spent in the SBN layers (forward and
    backward of the layer's autograd functions): a figure that other load on the machine does
    not distort, unlike wall-clock ratios. None when the layers run no custom autograd function
    (e.g. the FFT path), whose ops the profiler cannot attribute."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():  # kineto logs to fd 2 from C++ (e.g. gpuGetDeviceCount on CPU hosts)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(model, opt, x, y, amp, device)
        events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    sbn = sum(e.cpu_time_total for e in events
              if "SBN" in e.key and not e.key.startswith("autograd::engine"))
    return round(sbn / total, 4) if total and sbn else None


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the block (C++ log lines Python cannot filter)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _recipe_with_stats(recipe: str, stats: str):
    """The recipe with every SBN it inserts switched to ``stats``."""
    from sbn_surgery.recipe import load_recipe

    r = load_recipe(recipe)
    rules = [rule.model_copy(update={"sbn": rule.sbn.model_copy(update={"stats": stats})})
             if rule.sbn is not None and rule.sbn.stats is not None else rule for rule in r.rules]
    return r.model_copy(update={"sbn": r.sbn.model_copy(update={"stats": stats}), "rules": rules})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--recipe", default="resnet")
    ap.add_argument("--stats", default="channel,frequency",
                    help="comma-separated SBN modes to time against the plain model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="H = W of the input")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm

    from sbn_surgery import convert
    from sbn_surgery.layers import SpectralBatchNorm2d

    device = torch.device(args.device)
    mem = torch.channels_last if args.channels_last else torch.contiguous_format
    size = (3, args.size, args.size)
    torch.manual_seed(0)
    plain = timm.create_model(args.model, pretrained=False, num_classes=1000)
    modes = [m.strip() for m in args.stats.split(",") if m.strip()]
    models = {"plain": plain}
    for mode in modes:
        torch.manual_seed(0)
        models[mode], _ = convert(args.model, _recipe_with_stats(args.recipe, mode),
                                  num_classes=1000, input_size=size)
    opts = {}
    for name, m in models.items():
        m.to(device=device, memory_format=mem).train()
        opts[name] = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *size, generator=g).to(device).contiguous(memory_format=mem)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    for name, m in models.items():
        for _ in range(args.warmup):
            _step(m, opts[name], x, y, args.amp, device)
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            wall, proc = _step(m, opts[name], x, y, args.amp, device)
            times[name].append(wall)
            cpu[name].append(proc)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "benchmark": "train_step",
        "model": args.model,
        "recipe": args.recipe,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "input_size": list(size),
        "amp_bf16": args.amp,
        "channels_last": args.channels_last,
        "repeats": args.repeats,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "plain_median_ms": round(med["plain"] * 1e3, 2),
        "plain_images_per_s": round(args.batch / med["plain"], 1),
    }
    for mode in modes:
        out[mode] = {
            "sbn_layers": sum(isinstance(m, SpectralBatchNorm2d) for m in models[mode].modules()),
            "median_ms": round(med[mode] * 1e3, 2),
            "ratio": round(med[mode] / med["plain"], 4),
            "ratio_of_minima": round(min(times[mode]) / min(times["plain"]), 4),
            # process CPU time: less distorted than wall-clock by other load on the machine
            "cpu_ratio": round(med_cpu[mode] / med_cpu["plain"], 4),
            "sbn_share_of_step_cpu": _sbn_share(models[mode], opts[mode], x, y, args.amp, device),
            "images_per_s": round(args.batch / med[mode], 1),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
