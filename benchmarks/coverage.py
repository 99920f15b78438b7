"""Coverage: one model of every timm image-model family, converted with no ``--recipe``.

A family is the timm module that registers a model (``resnet``, ``vision_transformer``,
``swin_transformer``, ...): 98 in timm 1.0.31, all of them, whether they have BatchNorm or
not. Every registered model is first built on the ``meta`` device (no memory, no weights) to
learn its parameter count and whether it is a token model (timm's ``num_prefix_tokens``: the
ViT-like models); the scan is cached per timm version in the state folder. Each family is
represented by its smallest model (``test_*`` models only when it has nothing else), plus its
smallest token model where that is another one.

Each chosen model is then checked as a user would run it, with the recipe ``convert`` picks
for the name (the family's, else ``default``; ``--recipe`` forces one), from random weights
(``num_classes=10``):

1. convert: ``sbn_surgery.convert`` at 64x64; where the model rejects that size, at 64x64
   built with ``img_size=64`` (the models that take it), else at the nearest multiple of its
   patch size (70x70 for patch 14), else at 96, 112 or 128, else at the model's own size;
2. identity init: calibrated on random images, identity init keeps the eval output to 1e-4
   of its scale (convert's own check);
3. train step: a training forward and backward at batch 2 (cross-entropy on random labels)
   gives a finite loss and finite gradients, and every SBN layer gets a gradient (it is in the
   graph);
4. fold export: SBN gamma/beta moved off identity init at random (so the fold is not the
   identity; see ``_fold_export``), then ``sbn_surgery.export_onnx(mode="fold")``, parity
   with onnxruntime included, as ``sbn-surgery export`` runs it.

A family passes when every model chosen for it passes every check. One model at a time in this
process, memory freed between models, each within ``--timeout`` seconds (a model over it fails
at the stage it was in); each finished model is appended to ``rows.jsonl`` in the
state folder, and ``--resume`` takes the models already there instead of running them again, so
the sweep can run in chunks (``--families``) and survive an interruption. Prints one JSON
object (progress goes to stderr, one line per model): ``{"timm", "torch", "recipe",
"families", "passed", "failed", "passed_fraction", "failures": {family: reason}, "models":
[{"family", "model", "why", "recipe", "status", "stage", "reason", "input_size",
"model_kwargs", "sites", "layouts", "identity_rel_err", "parity", "seconds", ...}],
"scan_seconds", "total_seconds"}``.

    python benchmarks/coverage.py [--families resnet vgg ...] [--models NAME ...] [--resume]
                                  [--recipe NAME] [--size 64] [--timeout 300]
                                  [--state-dir runs/coverage]
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.models._registry import _model_to_module  # model name -> registering module

import sbn_surgery as sbn
from sbn_surgery.recipe import recipe_for_model
from sbn_surgery.surgery import find_sbn


def _family(name: str) -> str:
    return _model_to_module.get(name, "?").rsplit(".", 1)[-1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


# --------------------------------------------------------------------------------------------
# which models: the meta-device scan
# --------------------------------------------------------------------------------------------
def _scan_one(name: str) -> dict:
    info: dict = {"family": _family(name)}
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        info["params"] = sum(p.numel() for p in model.parameters())
        prefix = getattr(model, "num_prefix_tokens", None)
        info["tokens"] = isinstance(prefix, int) and not isinstance(prefix, bool)
        del model
    except Exception as exc:  # noqa: BLE001 - a model timm cannot build is reported
        info["error"] = _first_line(exc)
    return info


def scan(names: list[str], cache: Optional[Path]) -> dict[str, dict]:
    """Per model: family, parameter count, whether it is a token model; read from ``cache``
    where it has the model, and the cache updated with the rest."""
    known: dict[str, dict] = {}
    if cache is not None and cache.is_file():
        known = json.loads(cache.read_text())
    todo = [n for n in names if n not in known]
    for i, name in enumerate(todo):
        if i % 100 == 0:  # the scan takes minutes: say it is running (stdout is the JSON)
            print(f"scanning timm models on the meta device: {i}/{len(todo)}", file=sys.stderr,
                  flush=True)
        known[name] = _scan_one(name)
    if todo and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return {n: known[n] for n in names}


def choose(scanned: dict[str, dict]) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(family, model, why) to check, and family -> why it has no model to check."""
    by_family: dict[str, list[str]] = defaultdict(list)
    for name, info in scanned.items():
        by_family[info["family"]].append(name)
    chosen, unbuilt = [], {}
    for family, names in sorted(by_family.items()):
        built = [n for n in names if "error" not in scanned[n]]
        if not built:
            unbuilt[family] = "timm could not build any of its models"
            continue
        real = [n for n in built if not n.startswith("test_")] or built
        smallest = min(real, key=lambda n: (scanned[n]["params"], n))
        chosen.append((family, smallest, "smallest"))
        tokens = [n for n in real if scanned[n].get("tokens")]
        if tokens and not scanned[smallest].get("tokens"):
            chosen.append((family, min(tokens, key=lambda n: (scanned[n]["params"], n)),
                           "smallest token model"))
    return chosen, unbuilt


# --------------------------------------------------------------------------------------------
# the checks of one model
# --------------------------------------------------------------------------------------------
class _Failed(Exception):
    """A check failed; the row says which and why."""


def _meta_build(name: str, **kwargs) -> Optional[torch.nn.Module]:
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - its constructor has no such argument, or rejects it
        return None


#: Sides tried between ``--size`` and the model's own: multiples of 16, 32 and 48 (patch 16 with
#: a 3x3 pooling), of 14 and 28 (window 7 at stride 4 and 16).
STEP_SIZES = (96, 112, 128)


def _sizes(name: str, size: int, own: tuple) -> list[tuple[tuple, dict]]:
    """(input size, model kwargs) to try, smallest first: ``size``, then ``size`` built with
    ``img_size`` (the models that take it), then the nearest multiple of a ViT's patch size
    above ``size`` (70 for patch 14), then STEP_SIZES below the model's own input size (with
    ``img_size`` where the model takes it), then the model's own input size."""
    tries: list[tuple[tuple, dict]] = [((3, size, size), {})]
    if _meta_build(name, img_size=size) is not None:
        tries.append(((3, size, size), {"img_size": size}))
    model = _meta_build(name)
    patch = next((m.patch_size for m in (model.modules() if model is not None else ())
                  if getattr(m, "patch_size", None) is not None), None)
    patch = max(patch) if isinstance(patch, (tuple, list)) else patch
    sides = [-(-size // patch) * patch] if isinstance(patch, int) and patch > 0 else []
    for side in sides + [s for s in STEP_SIZES if s > size]:
        if side < min(own[1:]) and ((3, side, side), {}) not in tries:
            takes = _meta_build(name, img_size=side) is not None
            tries.append(((3, side, side), {"img_size": side} if takes else {}))
    if tuple(own) != (3, size, size):
        tries.append((tuple(own), {}))
    return tries


def _convert(row: dict, name: str, recipe: str, force: bool, size: int, own: tuple):
    """convert at the first input size the model runs at; the model, and the row filled."""
    tries = _sizes(name, size, own)
    errors: list[str] = []
    for input_size, kwargs in tries:
        torch.manual_seed(0)
        try:
            model, plan = sbn.convert(name, recipe, num_classes=10, init="identity",
                                      input_size=input_size, model_kwargs=kwargs or None,
                                      calibrate_batches=2, calibrate_batch_size=2, force=force)
        except Exception as exc:  # noqa: BLE001 - the size, a model or a rewriter bug: next size
            errors.append(f"{'x'.join(map(str, input_size[1:]))}{' img_size' if kwargs else ''}: "
                          + _first_line(exc))
            continue
        row.update(input_size=list(input_size), model_kwargs=kwargs, sites=plan.count,
                   identity_rel_err=plan.identity_error, tried=errors,
                   layouts=sorted({f"{s.layout}+{s.prefix_tokens}" if s.prefix_tokens
                                   else s.layout for s in plan.sites}))
        return model
    last = errors[-1] if errors else "no input size to try"
    raise _Failed("identity init" if "identity check" in last else "convert", last)


def _train_step(row: dict, model: torch.nn.Module) -> None:
    """Forward and backward at batch 2 in training mode: finite loss and gradients, and a
    gradient for every SBN layer."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *row["input_size"], generator=g)
    target = torch.randint(0, 10, (2,), generator=g)
    model.train()
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    loss = torch.nn.functional.cross_entropy(out.float().flatten(1), target)
    loss.backward()
    if not torch.isfinite(loss):
        raise _Failed("train step", f"the loss is {float(loss)}")
    bad = [n for n, p in model.named_parameters() if p.grad is not None
           and not torch.isfinite(p.grad).all()]
    if bad:
        raise _Failed("train step", f"non-finite gradients in {len(bad)} tensors, e.g. {bad[0]}")
    idle = [s.module for s in find_sbn(model) if model.get_submodule(s.module).weight.grad is None]
    if idle:
        raise _Failed("train step", f"{len(idle)} SBN layer(s) got no gradient (not in the "
                      f"graph), e.g. {idle[0]}")
    model.zero_grad(set_to_none=True)


def _fold_export(row: dict, model: torch.nn.Module) -> None:
    """SBN gamma/beta moved off identity init at random, then the fold export with its parity
    check. Each channel's gain is scaled by a factor in [0.5, 1.5] and its shift moved by
    N(0, 0.3) of its gain, so the fold is not the identity and the model keeps its own scale
    (gamma drawn afresh instead, a channel that calibration saw near zero variance gets a gain
    of up to 1/sqrt(eps), and over a hundred sites the random-weight model's output overflows
    float32 to inf and NaN in PyTorch itself: NASNet, PNASNet, Inception-v4)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for site in find_sbn(model):
            layer = model.get_submodule(site.module)
            gain = layer.weight.clone()
            layer.weight.mul_(torch.empty_like(gain).uniform_(0.5, 1.5, generator=g))
            layer.bias.add_(gain * torch.empty_like(gain).normal_(0.0, 0.3, generator=g))
    model.eval()
    with tempfile.TemporaryDirectory(prefix="sbn-coverage-") as tmp:
        try:
            result = sbn.export_onnx(model, Path(tmp) / "model.onnx", mode="fold")
        except sbn.SbnSurgeryError as exc:
            raise _Failed("fold export", _first_line(exc)) from None
    row["parity"] = result.parity.summary()
    row["dynamic_size"] = result.dynamic_size
    row["folded"] = sum(s.folded_into is not None for s in result.sites)
    row["export_notes"] = list(result.notes)


class _Timeout(BaseException):
    """The model ran over its time (a BaseException: the exporter's own handlers let it pass)."""


def _alarm(signum, frame):  # noqa: ARG001 - the signal handler's signature
    raise _Timeout()


def check_model(name: str, recipe: Optional[str], size: int, timeout: int = 0) -> dict:
    """Every check of one model, in at most ``timeout`` seconds (0: no limit); never raises.
    The row says how far it got."""
    t0 = time.perf_counter()
    picked = recipe or recipe_for_model(name)
    row: dict = {"model": name, "recipe": picked, "status": "failed", "stage": None,
                 "reason": None, "seconds": {}}
    model, stage = None, "convert"
    if timeout:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
    try:
        own = tuple(timm.get_pretrained_cfg(name).input_size)
        steps = (("convert", None), ("train step", _train_step), ("fold export", _fold_export))
        for stage, fn in steps:
            t = time.perf_counter()
            try:
                if fn is None:
                    model = _convert(row, name, picked, recipe is not None, size, own)
                else:
                    fn(row, model)
            except _Failed:
                raise
            except Exception as exc:  # noqa: BLE001 - anything else is a failure of this stage
                raise _Failed(stage, _first_line(exc)) from None
            row["seconds"][stage] = round(time.perf_counter() - t, 2)
        row["status"] = "passed"
    except _Failed as fail:
        row["stage"], row["reason"] = fail.args
    except _Timeout:
        row["stage"], row["reason"] = stage, f"ran over the {timeout} s per model (--timeout)"
    finally:
        signal.alarm(0)
        del model
        gc.collect()
        torch._dynamo.reset()  # the exporter's caches belong to one model
    row["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return row


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> dict[str, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["model"]] = row
    return rows


def summarize(rows: list[dict], unbuilt: dict[str, str]) -> dict:
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_family[r["family"]].append(r)
    failures = {f: "; ".join(f"{r['model']}: {r['stage']}: {r['reason']}" for r in rs
                             if r["status"] != "passed")
                for f, rs in sorted(by_family.items())}
    failures = {f: why for f, why in failures.items() if why}
    failures.update({f: why for f, why in unbuilt.items()})
    total = len(by_family) + len(unbuilt)
    passed = total - len(failures)
    return {"families": total, "passed": passed, "failed": len(failures),
            "passed_fraction": round(passed / total, 4) if total else None,
            "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default=None,
                    help="force this recipe on every model (default: the one convert picks)")
    ap.add_argument("--families", nargs="*", help="only these families (timm module names)")
    ap.add_argument("--models", nargs="*", help="check exactly these models (no scan)")
    ap.add_argument("--size", type=int, default=64, help="input height and width to try first")
    ap.add_argument("--state-dir", default="runs/coverage",
                    help="where the scan cache and the finished rows (rows.jsonl) are kept")
    ap.add_argument("--resume", action="store_true",
                    help="take the models already in rows.jsonl instead of checking them again")
    ap.add_argument("--timeout", type=int, default=300,
                    help="seconds per model before it counts as failed (0: no limit)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a shared machine; 0 leaves torch's default)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    state = Path(args.state_dir)
    t0 = time.perf_counter()
    unbuilt: dict[str, str] = {}
    if args.models:
        chosen = [(_family(n), n, "asked for") for n in args.models]
    else:
        names = timm.list_models()
        if args.families:
            names = [n for n in names if _family(n) in set(args.families)]
        cache = state / f"scan-timm-{timm.__version__}-torch-{torch.__version__}.json"
        chosen, unbuilt = choose(scan(names, cache))
    scan_s = time.perf_counter() - t0
    rows_path = state / "rows.jsonl"
    done = _read_rows(rows_path) if args.resume else {}
    state.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        rows_path.write_text("")
    rows = []
    for i, (family, name, why) in enumerate(chosen):
        row = done.get(name)
        if row is None or row.get("recipe_arg") != args.recipe or row.get("size") != args.size:
            row = {"family": family, "why": why, "recipe_arg": args.recipe, "size": args.size,
                   **check_model(name, args.recipe, args.size, args.timeout)}
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"[{i + 1}/{len(chosen)}] {family}: {name} {row['status']} "
              f"{row['seconds'].get('total')}s {row['stage'] or ''} {row['reason'] or ''}",
              file=sys.stderr, flush=True)
    print(json.dumps({
        "timm": timm.__version__, "torch": torch.__version__,
        "recipe": args.recipe or "as convert picks it", **summarize(rows, unbuilt),
        "scan_seconds": round(scan_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "model_seconds": round(sum(r["seconds"].get("total", 0) for r in rows), 1),
        "models": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
