"""Converted checkpoints: safetensors with the metadata needed to rebuild the model in one call.

A converted file is untrusted when read back (it may come from a colleague, or have been edited):
its metadata is validated by :class:`ConvertedMeta` (types and bounds; create_model arguments
that would read a file or download are refused), its embedded recipe goes through the recipe
loader (``yaml.safe_load``), and the model it describes is built on the ``meta`` device and
compared key by key, shape by shape, with the file's header before the real model is built.

The weights' preprocessing (``pretrained_cfg``: input size, mean, std, interpolation, crop, class
count and names; see :mod:`.pretrained_cfg`) is validated like the rest, becomes the rebuilt
model's timm ``pretrained_cfg`` (so timm's ``resolve_data_config(model=...)`` gives it), and
:func:`read_data_config` gives the eval data config of a file."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from .alloc import AllocationBudget
from .files import atomic_write
from .errors import CheckpointError, SbnSurgeryError
from .models import ARG_NAME, check_model_kwargs, create_model, load_weights
from .pretrained_cfg import EVAL_KEYS, PretrainedCfg
from .recipe import Recipe
from .surgery import apply_recipe
from .weights import load_safetensors, safetensors_shapes
from .yamlfile import key_text

__all__ = ["save_converted", "load_converted", "read_checkpoint_metadata", "read_metadata",
           "is_converted", "atomic_write", "read_data_config", "data_config_of_meta",
           "ConvertedMeta", "FORMAT"]

FORMAT = "sbn-surgery/converted-v1"
#: Metadata fields stored as JSON strings in the safetensors header.
_JSON_FIELDS = ("model_kwargs", "num_classes", "input_size", "extra", "pretrained_cfg")
#: Sanity bounds on metadata (the header's tensor shapes bound the model itself).
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 64
MAX_SIDE = 2048  # one probe forward at this size runs in the real build
MAX_RECIPE_CHARS = 256 * 1024
_Scalar = Union[bool, int, float, str, None]
#: A timm create_model argument: a scalar or a (nested, short) list of scalars, never a mapping.
_KwargValue = Union[_Scalar, list[Union[_Scalar, list[_Scalar]]]]


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

    from ._version import __version__

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


class ConvertedMeta(BaseModel):
    """The metadata of a converted checkpoint, validated before anything is built from it: the
    file may have been edited. Bounds are far above any real model; the shapes in the file's
    header are what really bounds the model (see :func:`load_converted`)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["sbn-surgery/converted-v1"]
    sbn_surgery_version: Optional[str] = Field(None, max_length=64)
    model_name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,200}$")
    model_kwargs: dict[str, _KwargValue] = Field(default_factory=dict, max_length=64)
    num_classes: Optional[StrictInt] = Field(None, ge=0, le=MAX_CLASSES)
    recipe: str = Field(max_length=MAX_RECIPE_CHARS)
    recipe_name: Optional[str] = Field(None, max_length=200)
    input_size: Optional[list[StrictInt]] = Field(None, min_length=3, max_length=3)
    init: Optional[str] = Field(None, max_length=32)
    extra: Optional[dict[str, Any]] = None
    #: the weights' preprocessing (bounded, unknown keys dropped; nothing in it names a source)
    pretrained_cfg: Optional[PretrainedCfg] = None

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _argument_names(cls, v):
        """A create_model argument is a Python name; any other key is refused without being
        repeated (the file may hold anything, and the message may reach a log)."""
        if isinstance(v, dict) and not all(isinstance(k, str) and ARG_NAME.fullmatch(k)
                                           for k in v):
            raise ValueError("has a key that is not a Python argument name")
        return v

    @field_validator("input_size")
    @classmethod
    def _size(cls, v):
        if v is not None and not (1 <= v[0] <= MAX_CHANNELS and all(1 <= d <= MAX_SIDE for d in v[1:])):
            raise ValueError(f"must be C H W with C in 1..{MAX_CHANNELS}, H and W in 1..{MAX_SIDE}")
        return v


def _meta_error(path: Path, exc: ValidationError) -> CheckpointError:
    err = exc.errors()[0]
    where = ".".join(str(p) if isinstance(p, int) or key_text(p) else "?"
                     for p in err["loc"]) or "metadata"
    return CheckpointError(f"{path}: metadata field {where!r} is invalid: {err['msg']}"
                           f"{f' ({len(exc.errors())} problems)' if len(exc.errors()) > 1 else ''}; "
                           "the file was edited or damaged, convert the original weights again")


def _is_header_of_ours(meta: dict[str, str]) -> bool:
    return meta.get("format") == FORMAT


def is_converted(path: str | Path) -> bool:
    """Whether ``path`` is a readable safetensors file with the converted-checkpoint marker
    (False for anything else, unreadable files included; reading it later says why)."""
    try:
        meta, _ = safetensors_shapes(path)
    except CheckpointError:
        return False
    return _is_header_of_ours(meta)


def _decode(path: Path, header: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in header.items():
        if key in _JSON_FIELDS:
            try:
                meta[key] = json.loads(value)
            except ValueError as exc:
                raise CheckpointError(f"{path}: metadata field {key!r} is not valid JSON ({exc}); "
                                      "the file was edited or damaged, convert the original "
                                      "weights again") from None
        else:
            meta[key] = value
    return meta


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(validated metadata, header shapes) of a converted checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        header, shapes = safetensors_shapes(path)
    except CheckpointError:
        if _saved_by_torch(path):
            raise CheckpointError(f"{path} is a PyTorch checkpoint (torch.save), not a converted "
                                  f"file; {_convert_hint(path)}") from None
        raise
    if not _is_header_of_ours(header):
        raise CheckpointError(f"{path} holds plain weights, not a converted file (no '{FORMAT}' "
                              f"metadata); {_convert_hint(path)}")
    meta = _decode(path, header)
    try:
        checked = ConvertedMeta.model_validate(meta)
    except ValidationError as exc:
        raise _meta_error(path, exc) from None
    check_model_kwargs(checked.model_kwargs, f"{path} metadata model_kwargs")
    return checked.model_dump(exclude_none=True), shapes


def _saved_by_torch(path: Path) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file: a zip archive, or (the legacy format)
    a pickle. Asked only of a file that is no valid safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80
                                                and 2 <= head[1] <= 5)


def _convert_hint(path: Path) -> str:
    name = path.name.split(".")[0] or "model"
    return (f"make one with `sbn-surgery convert MODEL -c {path} --recipe none -o "
            f"{name}-none.safetensors` (the model without SBN: the baseline), or with "
            "`--recipe RECIPE` (with SBN)")


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a converted checkpoint (JSON fields decoded, validated)."""
    return _read(path)[0]


#: The name this function had first; an ONNX file's metadata is ``read_onnx_metadata``.
read_metadata = read_checkpoint_metadata


def _build(meta: dict[str, Any], recipe: Recipe, budget: Optional[AllocationBudget] = None
           ) -> nn.Module:
    with budget if budget is not None else contextlib.nullcontext():
        model = create_model(meta["model_name"], num_classes=meta.get("num_classes"),
                             model_kwargs=meta.get("model_kwargs") or {})  # no weights: the file's
    if meta.get("pretrained_cfg") and isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in meta["pretrained_cfg"].items()})
    input_size = tuple(meta["input_size"]) if meta.get("input_size") else None
    apply_recipe(model, recipe, input_size=input_size, force=True)  # checked at convert
    return model


def _size_budget(path: Path, meta: dict[str, Any],
                 shapes: dict[str, tuple[int, ...]]) -> AllocationBudget:
    """What building the model that ``meta`` describes may allocate: twice the elements of the
    file's tensors, plus 16 M for what a build makes and drops. Any kwarg that would make the
    model larger (``stem_width=2**40``) is refused at the first allocation past it, on the meta
    device or a real one, before that allocation; a model timm cannot build on the meta device
    is still bounded."""
    held = sum(math.prod(shape) for shape in shapes.values())
    limit = 2 * held + (1 << 24)

    def refuse(total: int) -> CheckpointError:
        return CheckpointError(
            f"{path}: its metadata describes a model ({meta['model_name']}, "
            f"{meta.get('num_classes')} classes, with its model_kwargs) that does not fit its "
            f"tensors: building it asks for more than {total:,} tensor elements, the file holds "
            f"{held:,}; refused before allocating. The metadata was edited or the file damaged: "
            "convert the original weights again")

    return AllocationBudget(limit, refuse)


def _check_shapes(path: Path, meta: dict[str, Any], recipe: Recipe,
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """Build the described model on the meta device (nothing allocated) and compare its
    state_dict with the file's header; a mismatch is refused before the real build."""
    try:
        with torch.device("meta"):
            model = _build(meta, recipe, _size_budget(path, meta, shapes))
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except SbnSurgeryError:
        raise
    except Exception:  # noqa: BLE001 - a model timm cannot build on meta: the schema bounds hold
        return
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    differ = [f"{k} {shapes[k]} in the file vs {expected[k]}" for k in expected
              if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or differ:
        parts = [f"{n} {what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for n, what, keys in ((len(missing), "key(s) missing from the file", missing),
                                       (len(unexpected), "unexpected key(s)", unexpected),
                                       (len(differ), "shape mismatch(es)", differ)) if keys]
        raise CheckpointError(
            f"{path}: its metadata describes a model ({meta['model_name']}, "
            f"{meta.get('num_classes')} classes) that does not fit its tensors: "
            + "; ".join(parts) + ". The metadata was edited or the file damaged")


def load_converted(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model from its checkpoint in one call: timm model, recipe, weights.
    The metadata is validated and the model it describes is checked against the tensor shapes
    in the header before anything is allocated. The result carries ``model.sbn_meta``."""
    path = Path(path)
    meta, shapes = _read(path)
    recipe = Recipe.from_yaml_text(meta["recipe"], source=f"{path} (embedded recipe)")
    _check_shapes(path, meta, recipe, shapes)
    model = _build(meta, recipe, _size_budget(path, meta, shapes))
    load_weights(model, load_safetensors(path), source=str(path))
    model.to(map_location)
    model.sbn_meta = {k: v for k, v in meta.items() if k not in ("format",)}
    return model


def data_config_of_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The eval data config (timm's ``resolve_data_config`` keys: input_size, mean, std,
    interpolation, crop_pct, crop_mode) of a converted model's validated metadata (or its
    ``model.sbn_meta``): the stored ``pretrained_cfg``, completed from timm's config for the
    model name where a key is missing (files written before it was stored), at the file's
    ``input_size``; one mean and std per input channel (:func:`~.data.transforms.fit_channels`:
    a 1-channel model of 3-channel weights gets their average)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    from .data.transforms import fit_channels

    stored = dict(meta.get("pretrained_cfg") or {})
    base = get_pretrained_cfg(str(meta.get("model_name", "")))
    cfg: dict[str, Any] = base.to_dict() if base is not None else {}
    cfg.update({k: v for k, v in stored.items() if k in EVAL_KEYS})
    if "input_size" not in stored and meta.get("input_size"):
        cfg["input_size"] = meta["input_size"]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    resolved = fit_channels(resolve_data_config({}, pretrained_cfg=cfg))
    return {k: resolved[k] for k in EVAL_KEYS if k in resolved}


def read_data_config(path: str | Path) -> dict[str, Any]:
    """The eval data config of the converted file ``path`` (see :func:`data_config_of_meta`),
    for preprocessing images as the model expects them, e.g. in an exported file's metadata."""
    return data_config_of_meta(read_checkpoint_metadata(path))
