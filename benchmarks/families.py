"""The acceptance families without BatchNorm end to end, through the CLI as a user runs it.

For each model, in a temporary folder, one model at a time, with no ``--recipe`` anywhere (the
commands of README's ViT example)::

    sbn-surgery inspect MODEL --json                                 # at its own size
    sbn-surgery convert MODEL --num-classes 10 [--model-kwargs img_size=64] \\
        --input-size 3 64 64 -o sbn.safetensors --json
    sbn-surgery finetune sbn.safetensors --data digits --epochs 1 [extra] -o run --json
    sbn-surgery export run/best.safetensors -o m.onnx --json          # fold mode, with parity

Models are built from random weights (``convert`` never downloads) and trained with the
defaults, so the val top-1 after one epoch on digits says that the pipeline runs, not what the
family can reach.

Prints one JSON object: ``{"models": [{"model", "status" ("ok" | "failed"), "failed_step",
"reason", "recipe", "layouts", "sites", "folded", "val_top1", "plain_val_top1" (with --plain),
"parity_max_rel_err", "parity_passed", "seconds": {"inspect", "convert", "finetune", "export",
...}}], "ok", "failed", "total_seconds", "load_before", "load_after"}`` (load: the 1-minute load
average). Progress goes to stderr, one line per step. Exit 1 when a model failed. All 12 models
take about 27 minutes on 2 shared CPU cores (README, Convert).

    python benchmarks/families.py [--models vit_tiny_patch16_224 nf_resnet26] [--keep DIR]
                                  [--plain [also|only]] [--timeout SECONDS]

``--plain`` also converts each model with ``--recipe none`` and trains it the same way
(``plain_val_top1``): the control that tells a low top-1 of SBN from a low top-1 of the model;
``--plain only`` runs the control alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: model -> (``--model-kwargs`` for ``convert``, extra ``finetune`` options). A token model with a
#: fixed grid (ViT, DeiT, EVA-02, Swin, MLP-Mixer) is built at 64x64; NFNets train with adaptive
#: gradient clipping, as without SBN (at the default SGD lr NF-ResNet-26 diverges on digits).
#: tests/test_cli_families.py holds what each must give (recipe, layout, sites).
MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vit_tiny_patch16_224": (("img_size=64",), ()),
    "deit_tiny_patch16_224": (("img_size=64",), ()),
    "deit_tiny_distilled_patch16_224": (("img_size=64",), ()),
    "eva02_tiny_patch14_224": (("img_size=64",), ()),
    "swin_tiny_patch4_window7_224": (("img_size=64",), ()),
    "nf_resnet26": ((), ("--clip-grad", "0.01", "--clip-mode", "agc")),
    "edgenext_xx_small": ((), ()),
    "poolformer_s12": ((), ()),
    "convformer_s18": ((), ()),
    "mambaout_femto": ((), ()),
    "pvt_v2_b0": ((), ()),
    "mixer_s16_224": (("img_size=64",), ()),
}

SIZE = ("--input-size", "3", "64", "64")


def _cli() -> list[str]:
    """``sbn-surgery`` of this interpreter's environment, else the one on PATH."""
    exe = Path(sys.executable).with_name("sbn-surgery")
    found = str(exe) if exe.exists() else shutil.which("sbn-surgery")
    if found is None:
        sys.exit("families.py: no sbn-surgery command here (pip install -e . first)")
    return [found]


def _reason(proc: subprocess.CompletedProcess) -> str:
    """One line: the CLI's ``error:`` line, else the last line of stderr (a traceback's last)."""
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = (errors or lines or [f"exit {proc.returncode}, no stderr"])[-1]
    return line[:300]


class StepFailed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def _step(row: dict, step: str, args: list[str], cwd: Path, timeout: float) -> dict:
    """Run one CLI command with ``--json``; its seconds go into ``row``; returns its JSON."""
    print(f"  {step}: {' '.join(args)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([*_cli(), *args, "--json"], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(step, f"no result after {timeout:.0f} s") from exc
    finally:
        row["seconds"][step] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        raise StepFailed(step, _reason(proc))
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise StepFailed(step, f"stdout is not one JSON object: {exc}") from exc


def _plain_top1(row: dict, model: str, mk: list[str], train: tuple[str, ...], folder: Path,
                timeout: float) -> float:
    """The same model without SBN (``--recipe none``), trained the same way: the control."""
    _step(row, "plain_convert", ["convert", model, "--recipe", "none", "--num-classes", "10", *mk,
                                 *SIZE, "-o", "plain.safetensors"], folder, timeout)
    fit = _step(row, "plain_finetune", ["finetune", "plain.safetensors", "--data", "digits",
                                        "--epochs", "1", *train, "-o", "plain"], folder, timeout)
    return fit["val_top1"]


def _sbn_pipeline(row: dict, model: str, mk: list[str], train: tuple[str, ...], folder: Path,
                  timeout: float) -> None:
    """inspect, convert, finetune, export with no --recipe; fills ``row``."""
    seen = _step(row, "inspect", ["inspect", model], folder, timeout)
    row["recipe"], row["sites"] = seen["recipe"], seen["count"]
    conv = _step(row, "convert", ["convert", model, "--num-classes", "10", *mk, *SIZE,
                                  "-o", "sbn.safetensors"], folder, timeout)
    row["layouts"] = sorted({s["layout"] for s in conv["sites"]})
    if conv["recipe"] != row["recipe"] or conv["count"] != row["sites"]:
        raise StepFailed("convert", f"convert chose {conv['recipe']} ({conv['count']} "
                         f"sites), inspect {row['recipe']} ({row['sites']} sites)")
    fit = _step(row, "finetune", ["finetune", "sbn.safetensors", "--data", "digits",
                                  "--epochs", "1", *train, "-o", "run"], folder, timeout)
    row["val_top1"] = fit["val_top1"]
    exp = _step(row, "export", ["export", "run/best.safetensors", "-o", "m.onnx"], folder,
                timeout)
    parity = exp["parity"] or {}
    row["parity_max_rel_err"], row["parity_passed"] = (parity.get("max_rel_err"),
                                                       parity.get("passed"))
    row["folded"] = sum(1 for s in exp["sites"] if s.get("folded_into"))
    if exp["mode"] != "fold" or not parity.get("passed"):
        raise StepFailed("export", f"mode {exp['mode']}, parity {parity}")


def run_model(model: str, folder: Path, timeout: float, plain: str | None = None) -> dict:
    """One model; ``plain``: None, "also" (the control after the SBN pipeline) or "only"."""
    kwargs, train = MODELS[model]
    row: dict = {"model": model, "status": "ok", "failed_step": None, "reason": None,
                 "recipe": None, "layouts": None, "sites": None, "folded": None,
                 "val_top1": None, "plain_val_top1": None, "parity_max_rel_err": None,
                 "parity_passed": None, "seconds": {}}
    mk = ["--model-kwargs", *kwargs] if kwargs else []
    try:
        if plain != "only":
            _sbn_pipeline(row, model, mk, train, folder, timeout)
        if plain:
            row["plain_val_top1"] = _plain_top1(row, model, mk, train, folder, timeout)
    except StepFailed as exc:
        row["status"], row["failed_step"], row["reason"] = "failed", exc.step, exc.reason
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep each model's files in DIR/MODEL (default: a temporary folder, "
                         "removed after each model)")
    ap.add_argument("--plain", nargs="?", const="also", choices=["also", "only"], default=None,
                    help="also (or only) train each model without SBN (--recipe none), the same "
                         "way: plain_val_top1, the control for val_top1")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    args = ap.parse_args(argv)
    t0, rows = time.perf_counter(), []
    load_before = os.getloadavg()[0]
    for i, model in enumerate(args.models, 1):
        print(f"[{i}/{len(args.models)}] {model}", file=sys.stderr, flush=True)
        if args.keep is not None:
            folder = args.keep / model
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"families-{model}-"))
        try:
            row = run_model(model, folder, args.timeout, args.plain)
        finally:
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)
        brief = {k: row[k] for k in ("recipe", "val_top1", "plain_val_top1", "parity_max_rel_err",
                                     "reason")}
        print(f"  -> {row['status']}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    ok = [r["model"] for r in rows if r["status"] == "ok"]
    print(json.dumps({"models": rows, "ok": len(ok), "failed": len(rows) - len(ok),
                      "total_seconds": round(time.perf_counter() - t0, 1),
                      "load_before": round(load_before, 2),
                      "load_after": round(os.getloadavg()[0], 2)}, indent=1))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
