"""Coverage of the ``default`` recipe: one model of every timm family that has BatchNorm.

A family is the timm module that registers the model (``resnet``, ``efficientnet``, ``vgg``, ...).
Every registered model is first built on the ``meta`` device (no memory, no weights) to learn its
parameter count and norm layers; each family is represented by its smallest model that has a 2-D
BatchNorm (``test_*`` models only when nothing else has one). Families without any 2-D BatchNorm
are listed as skipped.

Each chosen model is then built for real (``pretrained=False``, ``num_classes=10``), converted
with ``default`` at 64x64 (or at the model's own input size when it rejects 64x64), and counts as
converted when all of these hold: the recipe applies, calibration plus identity init keep the eval
output (max abs error <= 1e-4 of the output scale), and a training forward and backward run.
One model at a time, memory freed between models.

Prints one JSON object: ``{"recipe", "timm", "torch", "families", "converted", "failed",
"converted_fraction", "failures": {model: reason}, "skipped": {family: why}, "scan_seconds",
"total_seconds", "models": [{"family", "model", "status", "reason", "sites", "input_size",
"identity_rel_err", "seconds"}]}``. The whole run takes about 6 minutes on 2 CPU cores (most of it
the meta-device scan of every timm model).

    python benchmarks/coverage.py [--recipe default] [--families resnet vgg ...] [--size 64]

Progress goes to stderr, one line per model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import warnings
from collections import defaultdict

import timm
import torch
from timm.models._registry import _model_to_module  # model name -> registering module

import sbn_surgery as sbn
from sbn_surgery.models import input_size_of
from sbn_surgery.surgery import synthetic_batches


def _family(name: str) -> str:
    return _model_to_module.get(name, "?").rsplit(".", 1)[-1]


def _has_bn2d(model: torch.nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if not isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm3d)):
                return True
        elif "BatchNorm" in type(m).__name__ and "1d" not in type(m).__name__:
            return True  # FrozenBatchNorm2d and other BN-compatible classes
    return False


def scan(names: list[str]) -> dict[str, dict]:
    """Per model, on the meta device: family, parameter count, whether it has a 2-D BatchNorm."""
    out = {}
    for i, name in enumerate(names):
        if i % 100 == 0:  # the scan takes minutes: say it is running (stderr; stdout is the JSON)
            print(f"scanning timm models on the meta device: {i}/{len(names)}", file=sys.stderr,
                  flush=True)
        info: dict = {"family": _family(name)}
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            info["params"] = sum(p.numel() for p in model.parameters())
            info["bn"] = _has_bn2d(model)
            del model
        except Exception as exc:  # noqa: BLE001 - a model timm cannot build is reported
            info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        out[name] = info
    return out


def choose(scanned: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
    """family -> chosen model, and family -> why skipped."""
    by_family: dict[str, list[str]] = defaultdict(list)
    for name, info in scanned.items():
        by_family[info["family"]].append(name)
    chosen, skipped = {}, {}
    for family, names in sorted(by_family.items()):
        with_bn = [n for n in names if scanned[n].get("bn")]
        if not with_bn:
            built = [n for n in names if "error" not in scanned[n]]
            skipped[family] = ("no BatchNorm2d-like module in any of its models" if built
                               else "timm could not build any of its models")
            continue
        real = [n for n in with_bn if not n.startswith("test_")] or with_bn
        chosen[family] = min(real, key=lambda n: (scanned[n]["params"], n))
    return chosen, skipped


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def try_convert(name: str, recipe: str, size: int) -> dict:
    """Build, convert, train step, identity check. Never raises."""
    t0 = time.perf_counter()
    row: dict = {"model": name, "status": "failed", "reason": None, "sites": 0, "input_size": None}
    _convert(row, name, recipe, size)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _convert(row: dict, name: str, recipe: str, size: int) -> None:
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
    except Exception as exc:  # noqa: BLE001
        row["reason"] = "build: " + _first_line(exc)
        return
    own = input_size_of(model)
    sizes = [(own[0], size, size)] + ([own] if own[1:] != (size, size) else [])
    reference = copy.deepcopy(model).eval()
    plan, err = None, None
    for input_size in sizes:
        try:
            plan = sbn.apply_recipe(model, recipe, input_size=input_size, force=True)
            row["input_size"] = list(input_size)
            break
        except sbn.SbnSurgeryError as exc:
            err = exc
            if sbn.find_sbn(model):
                sbn.strip_sbn(model)
            if "probe forward" not in str(exc):
                break  # the size is not the problem
        except Exception as exc:  # noqa: BLE001 - a bug in the rewriter
            err = exc
            break
    if plan is None:
        row["reason"] = "apply: " + _first_line(err) if err else "apply: no plan"
        return
    row["sites"] = plan.count
    stage = "identity init"
    try:
        x = torch.randn(2, *row["input_size"])
        sbn.calibrate(model, synthetic_batches(tuple(row["input_size"]), 2, 1), passthrough=True)
        sbn.init_identity(model)
        with torch.no_grad():
            y_ref, y = reference(x), model.eval()(x)
        err_rel = float((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12))
        row["identity_rel_err"] = err_rel
        if not err_rel <= 1e-4:
            row["reason"] = f"identity init changed the eval output: rel err {err_rel:.2e}"
            return
        stage = "train step"
        out = model.train()(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().sum().backward()
        row["status"] = "converted"
    except Exception as exc:  # noqa: BLE001
        row["reason"] = f"{stage}: " + _first_line(exc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="default", help="recipe to run (shipped name or path)")
    ap.add_argument("--families", nargs="*", help="only these families (timm module names)")
    ap.add_argument("--models", nargs="*", help="convert exactly these models (no scan)")
    ap.add_argument("--size", type=int, default=64, help="input height and width to try first")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: small models on a shared machine run fastest "
                         "single-threaded; 0 leaves torch's default)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.models:
        chosen, skipped = {_family(n): n for n in args.models}, {}
    else:
        names = timm.list_models()
        if args.families:
            names = [n for n in names if _family(n) in set(args.families)]
        chosen, skipped = choose(scan(names))
    scan_s = time.perf_counter() - t0
    rows = []
    for i, (family, name) in enumerate(sorted(chosen.items())):
        row = try_convert(name, args.recipe, args.size)
        rows.append({"family": family, **row})
        gc.collect()
        print(f"[{i + 1}/{len(chosen)}] {family}: {name} {row['status']} "
              f"{row.get('seconds')}s {row['reason'] or ''}", file=sys.stderr, flush=True)
    converted = sum(r["status"] == "converted" for r in rows)
    print(json.dumps({
        "recipe": args.recipe,
        "timm": timm.__version__,
        "torch": torch.__version__,
        "families": len(chosen),
        "converted": converted,
        "failed": len(rows) - converted,
        "converted_fraction": round(converted / len(rows), 4) if rows else None,
        "failures": {r["model"]: r["reason"] for r in rows if r["status"] != "converted"},
        "skipped": skipped,
        "scan_seconds": round(scan_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "models": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
