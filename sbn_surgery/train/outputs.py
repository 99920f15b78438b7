"""What a fine-tuning run writes into its output directory, always atomically.

* ``last.safetensors`` / ``best.safetensors``: converted checkpoints (``save_converted``).
* ``state.pt``: what ``--resume`` needs besides the weights: optimizer, scheduler, EMA, epoch
  and batch, RNG states, history, best metric and the run's options. Only tensors, containers
  and primitives, so ``torch.load(weights_only=True)`` reads it. It is kept while the run can go
  on: an interrupted run keeps it, a finished one drops it (twice the model's size, more with
  EMA) unless ``keep_state`` (``--keep-state``) keeps it to extend the run with ``--epochs``;
  a run started over another with ``--overwrite`` drops the other's as it begins.
* ``metrics.jsonl``: one JSON line per finished epoch.
* ``summary.csv``: the same epochs in the columns timm's ``train.py`` writes (``epoch`` from 0,
  ``train_loss``, ``eval_loss``, ``eval_top1``, ``eval_top5`` in percent, ``lr``: the epoch's
  mean), so tools that read timm runs read these.
* ``args.yaml``: the run's fully resolved options; ``finetune --config args.yaml`` repeats it.
* ``curves.png``: loss and accuracy against epoch.

Every file is written to a temporary file in the same directory and moved into place with
``os.replace`` (``files.atomic_write``): a crash or Ctrl-C while writing leaves the
previous file as it was, and the next run there removes what a killed one left.

One run at a time writes into a directory: :func:`run_lock` holds ``.sbn-surgery.lock`` there
(an advisory lock, which the kernel releases when the process ends, kill -9 included), and a
second run is refused with one line naming the first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_converted
from ..files import (FolderBusy, atomic_write_bytes, cause_text, lock_folder, probe_folder, remove_stale,
                     unlock_folder)
from ..errors import CheckpointError, WriteError

STATE_FILE = "state.pt"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.csv"
ARGS_FILE = "args.yaml"
EMA_FILE = "ema.safetensors"
CURVES_FILE = "curves.png"
STATE_FORMAT = 2  # 2: timm optimizer and scheduler, EMA; no AMP scaler


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """A converted checkpoint (``save_converted``'s format; its write is atomic)."""
    save_converted(model, path)


# --------------------------------------------------------------------------------------------
# one run per directory
# --------------------------------------------------------------------------------------------
def _describe_holder(holder: dict[str, Any]) -> str:
    """Who holds a run directory, from its lock file's (checked) record."""
    if not holder:
        return "another process (it has not said which)"
    parts = [f"pid {holder['pid']}" if "pid" in holder else "another process"]
    if holder.get("host") and holder["host"] != socket.gethostname():
        parts.append(f"on {holder['host']}")
    if "started" in holder:
        with contextlib.suppress(OverflowError, OSError, ValueError):
            parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S",
                                                    time.localtime(holder["started"])))
    text = ", ".join(parts)
    return text + (f": {holder['command']}" if holder.get("command") else "")


@contextlib.contextmanager
def run_lock(out: Path, what: str = "run") -> Iterator[None]:
    """Hold ``out`` (created if need be) for this process while the block runs: a second run
    there is refused with one :class:`CheckpointError` naming the first (pid, start time,
    command). On entry, the temporary files a killed run left there are removed, and the
    directory is proven to take a file."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {out} is a file; give a directory for the {what}")
    info = {"pid": os.getpid(), "started": time.time(), "host": socket.gethostname(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
    try:
        fd = lock_folder(out, info)
    except FolderBusy as busy:
        raise CheckpointError(
            f"--output {out} is in use by another run of this tool: "
            f"{_describe_holder(busy.holder)}. Wait for it to end, or choose another --output"
        ) from None
    except WriteError as exc:
        raise _unwritable(out, exc, what) from None
    try:
        remove_stale(out)
        try:
            probe_folder(out)
        except WriteError as exc:
            raise _unwritable(out, exc, what) from None
        yield
    finally:
        unlock_folder(fd)


def _unwritable(out: Path, exc: WriteError, what: str) -> CheckpointError:
    cause = cause_text(exc.errno) if exc.errno is not None else str(exc)
    return CheckpointError(f"--output {out} cannot hold the {what}'s files: {cause}")


# --------------------------------------------------------------------------------------------
# RNG states as plain tensors and primitives
# --------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# state.pt
# --------------------------------------------------------------------------------------------
def save_state(path: Path, state: dict[str, Any]) -> None:
    state = dict(state, format=STATE_FORMAT)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


#: What ``--resume`` reads from state.pt, with the types it needs ("world" is absent in states
#: written before it was kept).
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "options": (dict,), "epoch": (int,), "step": (int,), "model": (dict,), "optimizer": (dict,),
    "scheduler": (dict,), "history": (list,), "best_top1": (float, int),
    "best_epoch": (int,), "ranks": (list,),
}


def _state_problem(state: dict[str, Any]) -> Optional[str]:
    """What is wrong with a loaded state.pt's structure, or None."""
    for key, types in _STATE_TYPES.items():
        if key not in state:
            return f"the key {key!r} is missing"
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{key!r} is a {type(value).__name__}, not a {' or '.join(t.__name__ for t in types)}"
    if "world" in state and (isinstance(state["world"], bool) or not isinstance(state["world"], int)):
        return f"'world' is a {type(state['world']).__name__}, not an int"
    if state["epoch"] < 0 or state["step"] < 0:
        return f"epoch {state['epoch']} and step {state['step']} must not be negative"
    for key in ("model", "ema"):
        weights = state.get(key)
        if key == "ema" and weights is None:
            continue
        if not isinstance(weights, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
            return f"{key!r} is not a state dict of tensors"
    if not all(isinstance(row, dict) for row in state["history"]):
        return "'history' is not a list of epoch records"
    for i, rank in enumerate(state["ranks"]):
        if not isinstance(rank, dict) or (state["step"] > 0 and not (
                isinstance(rank.get("partial"), dict) and isinstance(rank.get("rng"), dict))):
            return f"ranks[{i}] lacks this process's partial epoch ('partial', 'rng')"
    if state["step"] > 0 and not state["ranks"]:
        return "it stopped mid-epoch but holds no process's partial epoch ('ranks' is empty)"
    optim = state["optimizer"]
    if not (isinstance(optim.get("state"), dict) and isinstance(optim.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in optim["param_groups"])):
        return "'optimizer' is not an optimizer state (state, param_groups)"
    return None


def _model_problem(state: dict[str, Any], last: Path) -> Optional[str]:
    """Whether state.pt's weights fit the model in last.safetensors (same keys and shapes)."""
    from ..weights import safetensors_shapes

    _, shapes = safetensors_shapes(last)
    own = {k: tuple(v.shape) for k, v in state["model"].items()}
    odd = sorted(set(own) ^ set(shapes)) or [k for k in own if own[k] != shapes[k]]
    if odd:
        return (f"its 'model' does not fit {last.name} ({len(odd)} key(s) differ in name or "
                f"shape, e.g. {odd[0]})")
    return None


def load_state(out_dir: Path) -> dict[str, Any]:
    """state.pt of the run in ``out_dir``, its structure checked (an untrusted file: read with
    ``weights_only=True``, and any problem is one CheckpointError naming the file)."""
    from ..weights import regular_file

    path = Path(out_dir) / STATE_FILE
    if not path.exists():
        if holds_run(out_dir):
            raise CheckpointError(
                f"nothing to resume: the run in {out_dir} finished and kept no {STATE_FILE} (a "
                f"finished run keeps it only with --keep-state); to train on, fine-tune "
                f"{Path(out_dir) / LAST_FILE} into another --output")
        raise CheckpointError(
            f"nothing to resume: {path} does not exist; run without --resume to start a new run "
            f"in {out_dir}, or give the --output directory of the run to continue"
        )
    if not (Path(out_dir) / LAST_FILE).is_file():
        raise CheckpointError(f"cannot resume: {path} exists but {Path(out_dir) / LAST_FILE} "
                              f"does not; start a new run without --resume")
    regular_file(path, "state file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the file's fault
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc).strip() else 'no detail'}; "
                              "it is truncated or not a torch file; start a new run without "
                              "--resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a state file of this version of sbn-surgery "
                              f"(format {state.get('format') if isinstance(state, dict) else '?'}, "
                              f"expected {STATE_FORMAT}); start a new run without --resume")
    problem = _state_problem(state) or _model_problem(state, Path(out_dir) / LAST_FILE)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}; start a new run without --resume")
    return state


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run, finished or not (a new run there needs --overwrite)."""
    return any((Path(out_dir) / name).exists() for name in (STATE_FILE, LAST_FILE, METRICS_FILE))


def drop_state(out_dir: Path, keep: bool) -> bool:
    """At the end of a finished run: remove its state.pt unless ``keep``. Returns whether a
    state.pt is left."""
    path = Path(out_dir) / STATE_FILE
    if not keep:
        path.unlink(missing_ok=True)
    return path.exists()


# --------------------------------------------------------------------------------------------
# metrics and curves
# --------------------------------------------------------------------------------------------
def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, sort_keys=False) + "\n" for row in history)
    atomic_write_bytes(path, text.encode())


#: timm train.py's summary.csv columns, and the metrics.jsonl key (and scale) of each.
SUMMARY_COLUMNS = (("epoch", "epoch", 1), ("train_loss", "loss", 1),
                   ("eval_loss", "val_loss", 1), ("eval_top1", "top1", 100),
                   ("eval_top5", "top5", 100), ("lr", "lr", 1))


def write_summary(path: Path, history: list[dict[str, Any]]) -> None:
    """summary.csv in timm's columns: epochs from 0, accuracies in percent. With 5 classes or
    fewer top-5 is top-all, 100 (as timm's ``accuracy`` with ``topk=(1, min(5, classes))``)."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([name for name, _, _ in SUMMARY_COLUMNS])
    for row in history:
        values = []
        for name, key, scale in SUMMARY_COLUMNS:
            value = row.get(key)
            if name == "epoch":
                value = int(value) - 1
            elif name == "eval_top5" and value is None:
                value = 1.0
            values.append(value * scale)
        writer.writerow(values)
    atomic_write_bytes(path, buf.getvalue().encode())


def write_args(path: Path, options: dict[str, Any]) -> None:
    """args.yaml: every option of the run, resolved (``finetune --config`` reads it back)."""
    import yaml

    text = yaml.safe_dump(options, sort_keys=False, default_flow_style=None)
    atomic_write_bytes(path, text.encode())


def plot_curves(path: Path, history: list[dict[str, Any]], title: Optional[str] = None) -> None:
    """:func:`curves_figure` as a PNG."""
    buf = io.BytesIO()
    curves_figure(history, title).savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def curves_figure(history: list[dict[str, Any]], title: Optional[str] = None):
    """Loss (train, val) and accuracy (val top-1, top-5) against epoch; with ``--model-ema``,
    the EMA model's val loss and top-1 too (dashed)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["loss"] for row in history], "o-", label="train loss")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "s-", label="val loss")
    ema = all(row.get("ema_top1") is not None for row in history)
    if ema:
        ax_loss.plot(epochs, [row["ema_val_loss"] for row in history], "s--", label="EMA val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * row["top1"] for row in history], "o-", label="val top-1")
    if all(row.get("top5") is not None for row in history):  # no top-5 with 5 classes or fewer
        ax_acc.plot(epochs, [100 * row["top5"] for row in history], "s-", label="val top-5")
    if ema:
        ax_acc.plot(epochs, [100 * row["ema_top1"] for row in history], "o--",
                    label="EMA val top-1")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.set_xticks(epochs if len(epochs) <= 12 else ax.get_xticks())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
