"""onnxruntime CPU latency of a model with SBN in each export mode, against the same model
without SBN.

By default ResNet-50 at 224x224 gets SBN after bn3 of every block in layer3 and layer4 (the
shipped ``resnet`` recipe: 9 layers, channel mode); ``--model vit_small_patch16_224`` gets the
``vit`` recipe's 6 layers on tokens after mlp.fc2 of blocks 6-11, whose scale folds into fc2
(``--recipe`` picks another; default: the recipe for the model's family). SBN is calibrated on
random images with random gamma/beta, BatchNorms get random trained-like parameters. The model
without SBN is the same network with the SBN layers stripped. Each file is exported
with parity checked (as `sbn-surgery export` does), then timed with onnxruntime CPU at each
batch size, alternating with the file without SBN in the same loop; the figure per mode and batch
is median latency / median latency without SBN. Targets: fold <= 1.05, matmul <= 1.5; dft is
reported. Two clocks: ``ratio`` is wall-clock latency with onnxruntime's default threads (what
a user sees, but noisy on a shared machine); ``cpu_ratio`` is process CPU time per run with one
intra-op thread (the work a run costs, robust to other load). Prints one JSON object.

    python benchmarks/export.py [--model resnet50] [--recipe NAME] [--batches 1 8]
                                [--repeats 15] [--dft-repeats 5] [--threads N]
                                [--modes fold matmul dft matmul:separable] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"fold": 1.05, "matmul": 1.5}


def build(name: str, recipe: str, input_size: tuple[int, int, int]):
    import timm

    from sbn_surgery import apply_recipe, calibrate, strip_sbn

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like norms (timm zero-initializes bn3, which feeds SBN)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    plan = apply_recipe(model, recipe, input_size=input_size)
    calibrate(model, [torch.randn(4, *input_size, generator=g) for _ in range(2)])
    with torch.no_grad():
        for site in plan.sites:
            sbn = model.get_submodule(site.module)
            sbn.weight.uniform_(0.5, 1.5, generator=g)
            sbn.bias.normal_(0.0, 0.3, generator=g)
    plain = strip_sbn(copy.deepcopy(model))
    return model, plain, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="timm model name")
    ap.add_argument("--recipe", default=None, help="default: the recipe for the model's family")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dft-repeats", type=int, default=5, help="dft mode is slow on CPU")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--modes", nargs="+", default=["fold", "matmul", "dft"],
                    help="export modes; MODE:LAYOUT picks the matmul layout (dense, separable)")
    ap.add_argument("--out-dir", default=None, help="keep the ONNX files here")
    args = ap.parse_args()

    import onnxruntime

    from sbn_surgery import export_onnx
    from sbn_surgery.parity import bench
    from sbn_surgery.recipe import recipe_for_model

    recipe = args.recipe or recipe_for_model(args.model)
    size = (3, args.size, args.size)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model, plain, plan = build(args.model, recipe, size)
    build_s = time.perf_counter() - t0
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out_dir or tmp.name)
    out.mkdir(parents=True, exist_ok=True)

    exports = {}
    files = {}
    t0 = time.perf_counter()
    baseline = export_onnx(plain, out / f"{args.model}-plain.onnx", mode="fold", input_size=size)
    exports["plain"] = {"export_s": round(time.perf_counter() - t0, 1),
                        "parity": baseline.parity.summary()}
    for spec in args.modes:
        mode, _, layout = spec.partition(":")
        t0 = time.perf_counter()
        res = export_onnx(model, out / f"{args.model}-sbn-{spec.replace(':', '-')}.onnx", mode=mode,
                          input_size=size, layout=layout or "auto")
        files[spec] = res.path
        exports[spec] = {"export_s": round(time.perf_counter() - t0, 1),
                         "parity": res.parity.summary(), "dynamic_size": res.dynamic_size,
                         "folded": sum(1 for s in res.sites if s.folded_into),
                         "size_mb": round(res.size_bytes / 1e6, 1)}

    results = []
    for batch in args.batches:
        for spec, path in files.items():
            mode = spec.partition(":")[0]
            repeats = args.dft_repeats if mode == "dft" else args.repeats
            rep = bench(path, baseline.path, batch=batch, warmup=args.warmup, threads=args.threads,
                        repeats=repeats)
            cpu = bench(path, baseline.path, batch=batch, warmup=args.warmup, threads=1,
                        repeats=repeats, clock="cpu")
            row = {"mode": spec, "batch": batch, "latency_ms": round(rep.latency_ms, 2),
                   "no_sbn_latency_ms": round(rep.against_latency_ms, 2),
                   "ratio": round(rep.ratio, 3),
                   "cpu_ms_1thread": round(cpu.latency_ms, 2),
                   "no_sbn_cpu_ms_1thread": round(cpu.against_latency_ms, 2),
                   "cpu_ratio": round(cpu.ratio, 3), "repeats": repeats}
            if mode in TARGETS and ":" not in spec:
                row["target"] = TARGETS[mode]
                row["meets_target"] = rep.ratio <= TARGETS[mode] and cpu.ratio <= TARGETS[mode]
            results.append(row)

    print(json.dumps({
        "benchmark": "export",
        "model": args.model,
        "input_size": list(size),
        "recipe": recipe,
        "sbn_layers": len(plan.sites),
        "sites": [s.module for s in plan.sites],
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "threads": args.threads,
        "load_average_1min": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "build_s": round(build_s, 1),
        "exports": exports,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
