"""Converted checkpoints: safetensors with the metadata needed to rebuild the model in one call."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import CheckpointError
from .models import create_model, load_weights
from .recipe import Recipe
from .surgery import apply_recipe

__all__ = ["save_converted", "load_converted", "read_metadata", "atomic_write", "FORMAT"]

FORMAT = "sbn-surgery/converted-v1"
#: Metadata fields stored as JSON strings in the safetensors header.
_JSON_FIELDS = ("model_kwargs", "num_classes", "input_size", "extra")


def _umask() -> int:
    try:  # Linux shows it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename over ``path``: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the
        # umask), so a server running as another user can read a model written here
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _meta_of(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, "sbn_meta", None)
    if not isinstance(meta, dict) or "model_name" not in meta or "recipe" not in meta:
        raise CheckpointError(
            "save_converted needs model.sbn_meta (model_name, recipe, ...); convert the model with "
            "sbn_surgery.convert(...) or load it with load_converted(...)"
        )
    return meta


def save_converted(model: nn.Module, path: str | Path, *, extra: Optional[dict] = None) -> None:
    """Write the converted model's weights as safetensors, with its timm name and kwargs, the recipe
    text and the library version as metadata. The write is atomic."""
    from safetensors.torch import save_file

    from . import __version__

    meta = dict(_meta_of(model))
    if extra:
        meta["extra"] = {**meta.get("extra", {}), **extra}
    header = {"format": FORMAT, "sbn_surgery_version": __version__}
    for key, value in meta.items():
        header[key] = json.dumps(value) if key in _JSON_FIELDS else str(value)
    seen: dict[int, str] = {}
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.data_ptr()
        if ptr in seen and t.numel():  # tied weights: safetensors stores each storage once
            t = t.clone()
        seen[ptr] = key
        tensors[key] = t
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a converted checkpoint (JSON fields decoded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); converted "
            "checkpoints come from `sbn-surgery convert` or `finetune`."
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an sbn-surgery converted checkpoint (no '{FORMAT}' metadata). For "
            "original timm weights use `sbn-surgery convert MODEL --checkpoint FILE`."
        )
    meta: dict[str, Any] = {}
    for key, value in header.items():
        meta[key] = json.loads(value) if key in _JSON_FIELDS else value
    return meta


def load_converted(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model from its checkpoint in one call: timm model, recipe, weights.
    The result carries ``model.sbn_meta``."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    model = create_model(meta["model_name"], num_classes=meta.get("num_classes"),
                         model_kwargs=meta.get("model_kwargs") or {})
    recipe = Recipe.from_yaml_text(meta["recipe"], source=f"{path} (embedded recipe)")
    input_size = tuple(meta["input_size"]) if meta.get("input_size") else None
    apply_recipe(model, recipe, input_size=input_size, force=True)  # checked at convert
    load_weights(model, load_file(str(path)), source=str(path))
    model.to(map_location)
    model.sbn_meta = {k: v for k, v in meta.items() if k not in ("format",)}
    return model
