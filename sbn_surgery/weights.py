"""Reading the weights files a user hands over, every one untrusted.

* Only regular files are opened (a symlink to ``/dev/zero`` or a FIFO would never end); an empty
  or truncated file is a one-line :class:`CheckpointError`, never a parser's traceback.
* ``.safetensors``: the 8-byte header length is checked against the file size before the
  header is parsed; tensors are read by ``safetensors``.
* Anything else is read with ``torch.load(weights_only=True)``. Like timm's own loader, the one
  global allowed on top of torch's list is ``argparse.Namespace`` (the ``args`` that timm's
  ``train.py`` stores), in a scope that ends with the call. Nothing is ever unpickled freely.
* A timm training checkpoint (``state_dict``, ``state_dict_ema``, ``optimizer``, ``args``, ...)
  yields the state dict under ``key`` (default: the first of ``state_dict``, ``model``,
  ``module``, ``state_dict_ema``, ``model_ema``); ``module.`` (DDP) and ``_orig_mod.``
  (torch.compile) prefixes shared by every key are removed, in any combination.
* A directory is a Hugging Face / timm snapshot: ``model.safetensors`` (else
  ``pytorch_model.bin``) beside an optional ``config.json``, of which only ``architecture``,
  ``num_classes`` and the preprocessing of the weights (``pretrained_cfg``: input size, mean,
  std, interpolation, crop, class names; see :mod:`.pretrained_cfg`) are read (with :mod:`json`,
  bounded); no path, URL or repository named inside it is ever followed.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import CheckpointError
from .pretrained_cfg import check_cfg, subset

__all__ = ["Weights", "read_weights", "read_config", "regular_file", "safetensors_shapes",
           "STATE_DICT_KEYS"]

#: Keys of a training checkpoint tried in order when no key is given.
STATE_DICT_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
#: Prefixes that wrappers put in front of every key: DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SNAPSHOT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MAX_CONFIG_BYTES = 1 << 20
#: safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100 << 20
HINT = ("give a .safetensors file, a .pth/.pt/.pth.tar file saved with torch.save (a state dict "
        "or timm's train.py checkpoint), or a Hugging Face/timm snapshot directory")

PathLike = Union[str, os.PathLike]


@dataclass
class Weights:
    """A state dict read from ``source``, with what a snapshot's config.json says of its model."""

    state: dict[str, torch.Tensor]
    source: str
    architecture: Optional[str] = None
    num_classes: Optional[int] = None
    #: What config.json says of the weights' preprocessing (validated; see .pretrained_cfg).
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)


def regular_file(path: PathLike, what: str = "checkpoint") -> Path:
    """``path`` if it is a non-empty regular file (after symlinks); a CheckpointError otherwise."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} not found; {HINT}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise CheckpointError(f"{what} {path} is {kind}; {HINT}")
    if st.st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes); it was not written completely, "
                              "copy or save it again")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_safetensors_size(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if size < 8:
        raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, shorter than the "
                              "8-byte header length; it is truncated, copy or save it again")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"{path} is not a valid safetensors file: its header claims {n} "
                              f"bytes, the file has {size}; it is truncated or not safetensors")


def safetensors_shapes(path: PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {key: shape}) from a safetensors header, without reading any tensor."""
    from safetensors import safe_open

    path = regular_file(path)
    _check_safetensors_size(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)}); "
                              "it is truncated or not safetensors, copy or save it again") from None
    return meta, shapes


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    safetensors_shapes(path)  # the header is sound before any tensor is read
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read the tensors of {path} ({_first_line(exc)}); it is "
                              "truncated or damaged, copy or save it again") from None


def _unsafe_globals(path: Path) -> str:
    try:  # reads the pickle's opcodes, runs nothing
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001
        return ""
    return f" (it needs {', '.join(names[:4])}, which is never unpickled)" if names else ""


def torch_load(path: PathLike) -> Any:
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed, as timm does."""
    path = regular_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is the file's fault
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain "
                f"containers{_unsafe_globals(path)}; save the weights with "
                "torch.save(model.state_dict()) or as .safetensors") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}; it is "
                              f"truncated or not a torch file. {HINT[0].upper()}{HINT[1:]}") from None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _describe_keys(obj: dict) -> str:
    keys = [str(k) for k in obj]
    shown = ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
    return shown or "none"


def select_state_dict(obj: Any, key: Optional[str], source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: under ``key``, or found by timm's usual keys."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict; "
                              "save it with torch.save(model.state_dict())")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"--checkpoint-key {key!r} is not in {source}; its keys are: "
                                  f"{_describe_keys(obj)}")
        if not _is_state_dict(obj[key]):
            raise CheckpointError(f"--checkpoint-key {key!r} of {source} does not hold a state "
                                  f"dict of tensors; its keys are: {_describe_keys(obj)}")
        return obj[key]
    if _is_state_dict(obj):
        return obj
    for name in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(name)):
            return obj[name]
    raise CheckpointError(f"checkpoint {source} holds no state dict of tensors under "
                          f"{', '.join(STATE_DICT_KEYS)}; its keys are: {_describe_keys(obj)}. "
                          "Name the one to load with --checkpoint-key")


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``_orig_mod.`` while every key starts with the same one of them. A prefix
    on only some keys stays (those keys then fail to fit, by name), so two keys never merge."""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None or any(len(k) == len(prefix) for k in state):
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}


def read_config(path: Path) -> dict[str, Any]:
    """What a snapshot folder's config.json says (architecture, num_classes, pretrained_cfg);
    {} without one."""
    config = path / "config.json"
    if not config.exists():
        return {}
    config = regular_file(config, "snapshot config")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{config} is larger than {MAX_CONFIG_BYTES} bytes; not a timm config")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config} is not valid JSON ({_first_line(exc)}); fix it or remove "
                              "it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} is not a JSON object")
    out: dict[str, Any] = {}
    arch = data.get("architecture")
    if arch is not None:
        if not isinstance(arch, str) or not arch or len(arch) > 200:
            raise CheckpointError(f"{config}: 'architecture' is not a model name (a string of 1 "
                                  "to 200 characters); fix or remove it")
        out["architecture"] = arch
    n = data.get("num_classes")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 10_000_000:
            raise CheckpointError(f"{config}: 'num_classes' is not a class count (an integer "
                                  "from 0 to 10000000); fix or remove it")
        out["num_classes"] = n
    out["pretrained_cfg"] = _preprocessing(config, data, n)
    return out


def _preprocessing(config: Path, data: dict[str, Any], num_classes: Optional[int]) -> dict:
    """The weights' preprocessing in a timm config.json: its ``pretrained_cfg`` (or, in the
    older single-dict form, the top level), with ``label_names`` (``labels`` in the old form)."""
    cfg = data.get("pretrained_cfg")
    cfg = cfg if isinstance(cfg, dict) else data
    kept = subset(cfg)
    labels = data.get("label_names", cfg.get("label_names", cfg.get("labels")))
    if labels is not None:
        kept["label_names"] = labels
    if num_classes is not None:
        kept["num_classes"] = num_classes
    try:
        return check_cfg(kept)
    except ValueError as exc:
        raise CheckpointError(f"{config}: pretrained_cfg {exc}; fix it or remove it") from None


def _snapshot_file(path: Path) -> Path:
    for name in SNAPSHOT_WEIGHTS:
        if (path / name).exists():
            return path / name
    raise CheckpointError(f"checkpoint directory {path} holds no {' or '.join(SNAPSHOT_WEIGHTS)}; "
                          "give a Hugging Face/timm snapshot directory, or the weights file itself")


def read_weights(path: PathLike, key: Optional[str] = None) -> Weights:
    """The state dict in ``path`` (file or snapshot directory), wrappers removed."""
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        config = read_config(path)
        path = _snapshot_file(path)
    path = regular_file(path)
    if path.suffix == ".safetensors":
        if key is not None:
            raise CheckpointError(f"--checkpoint-key {key!r}: {path} is a safetensors file, which "
                                  "holds one state dict; leave --checkpoint-key out")
        state = load_safetensors(path)
        if not state:
            raise CheckpointError(f"checkpoint {path} holds no tensors")
    else:
        state = select_state_dict(torch_load(path), key, str(path))
    return Weights(strip_wrappers(dict(state)), str(path), config.get("architecture"),
                   config.get("num_classes"), config.get("pretrained_cfg") or {})
