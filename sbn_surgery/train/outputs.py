"""What a fine-tuning run writes into its output directory, always atomically.

* ``last.safetensors`` / ``best.safetensors``: converted checkpoints (``save_converted``).
* ``state.pt``: what ``--resume`` needs besides the weights: optimizer, scheduler, scaler, epoch
  and batch, RNG states, history, best metric and the run's options. Only tensors, containers
  and primitives, so ``torch.load(weights_only=True)`` reads it.
* ``metrics.jsonl``: one JSON line per finished epoch.
* ``curves.png``: loss and accuracy against epoch.

Every file is written to a temporary file in the same directory and moved into place with
``os.replace`` (``checkpoint.atomic_write``): a crash or Ctrl-C while writing leaves the
previous file as it was.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_write, save_converted
from ..errors import CheckpointError

STATE_FILE = "state.pt"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
STATE_FORMAT = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """A converted checkpoint (``save_converted``'s format; its write is atomic)."""
    save_converted(model, path)


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


def load_state(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume: {path} does not exist; run without --resume to start a new run "
            f"in {out_dir}, or give the --output directory of the run to continue"
        )
    if not (Path(out_dir) / LAST_FILE).is_file():
        raise CheckpointError(f"cannot resume: {path} exists but {Path(out_dir) / LAST_FILE} "
                              f"does not; start a new run without --resume")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the file's fault
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}; start a new run "
                              f"without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a state file of this version of sbn-surgery "
                              f"(format {state.get('format') if isinstance(state, dict) else '?'}, "
                              f"expected {STATE_FORMAT}); start a new run without --resume")
    return state


# --------------------------------------------------------------------------------------------
# metrics and curves
# --------------------------------------------------------------------------------------------
def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, sort_keys=False) + "\n" for row in history)
    atomic_write_bytes(path, text.encode())


def plot_curves(path: Path, history: list[dict[str, Any]], title: Optional[str] = None) -> None:
    """Loss (train, val) and accuracy (val top-1, top-5) against epoch, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["loss"] for row in history], "o-", label="train loss")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "s-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * row["top1"] for row in history], "o-", label="val top-1")
    if all(row.get("top5") is not None for row in history):  # no top-5 with 5 classes or fewer
        ax_acc.plot(epochs, [100 * row["top5"] for row in history], "s-", label="val top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.set_xticks(epochs if len(epochs) <= 12 else ax.get_xticks())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
