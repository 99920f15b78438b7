"""What a model's weights expect of their images: the part of timm's ``pretrained_cfg`` that
travels with a converted file (metadata key ``pretrained_cfg``), and its schema.

A weights file was trained with one preprocessing: input size, mean and std, resize
interpolation, eval crop (``crop_pct``, ``crop_mode``), and a head of ``num_classes`` outputs,
whose class names timm sometimes knows (``label_names``). These are the keys kept here
(:data:`KEYS`); timm's other ``pretrained_cfg`` keys (``url``, ``hf_hub_id``, ``file``, ...) say
where weights come from and are never kept, so nothing read back from a file can name a place
to download from.

The values come from untrusted places (a converted file's metadata, a snapshot's
``config.json``), so :class:`PretrainedCfg` bounds every one; unknown keys are dropped.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

__all__ = ["KEYS", "EVAL_KEYS", "INTERPOLATIONS", "PretrainedCfg", "subset", "check_cfg"]

#: The keys kept, in timm's names.
KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "num_classes",
        "label_names")
#: The keys of timm's ``resolve_data_config``: the eval preprocessing.
EVAL_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
#: Resize interpolations timm's transforms know (``timm.data.str_to_interp_mode``).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
MAX_CHANNELS = 64
MAX_SIDE = 8192
MAX_CLASSES = 1_000_000
#: Class names kept: at most this many (ImageNet-22k has 21843), each at most this long.
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 200


class PretrainedCfg(BaseModel):
    """The kept keys, each optional and bounded; unknown keys are dropped."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    input_size: Optional[list[StrictInt]] = Field(None, min_length=3, max_length=3)
    mean: Optional[list[float]] = Field(None, min_length=1, max_length=MAX_CHANNELS)
    std: Optional[list[float]] = Field(None, min_length=1, max_length=MAX_CHANNELS)
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest", "box", "hamming",
                                    "lanczos"]] = None
    crop_pct: Optional[float] = Field(None, gt=0, le=4)
    crop_mode: Optional[Literal["center", "squash", "border"]] = None
    num_classes: Optional[StrictInt] = Field(None, ge=0, le=MAX_CLASSES)
    label_names: Optional[list[str]] = Field(None, max_length=MAX_LABELS)

    @field_validator("input_size")
    @classmethod
    def _size(cls, v):
        if v is not None and not (1 <= v[0] <= MAX_CHANNELS and all(1 <= d <= MAX_SIDE
                                                                     for d in v[1:])):
            raise ValueError(f"must be C H W with C in 1..{MAX_CHANNELS}, H and W in "
                             f"1..{MAX_SIDE}")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _stats(cls, v, info):
        if v is not None and not all(-1e3 <= x <= 1e3 for x in v):
            raise ValueError("values must lie in [-1000, 1000]")
        if v is not None and info.field_name == "std" and not all(x > 0 for x in v):
            raise ValueError("values must be > 0")
        return v

    @field_validator("label_names")
    @classmethod
    def _labels(cls, v):
        if v is not None and any(len(s) > MAX_LABEL_CHARS for s in v):
            raise ValueError(f"each name must be at most {MAX_LABEL_CHARS} characters")
        return v


def _plain(value: Any) -> Any:
    """Tuples as lists (JSON's and the schema's form)."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def subset(cfg: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The kept keys of a timm ``pretrained_cfg`` (or ``config.json``'s), None values left out,
    tuples as lists; not validated (see :func:`check_cfg`)."""
    return {k: _plain(cfg[k]) for k in KEYS if cfg and cfg.get(k) is not None}


def check_cfg(cfg: Mapping[str, Any], *, drop_bad_labels: bool = False) -> dict[str, Any]:
    """``cfg`` validated by :class:`PretrainedCfg` (unknown keys dropped, None left out);
    a ValueError whose message names the first bad key otherwise. ``drop_bad_labels``: class
    names beyond the bounds (more than MAX_LABELS, a name too long) are left out instead,
    where they are all that is wrong (what the weights or a run record keeps the rest)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"must be a mapping of {', '.join(KEYS)}; got a {type(cfg).__name__}")
    try:
        return PretrainedCfg.model_validate(dict(cfg)).model_dump(exclude_none=True)
    except ValidationError as exc:
        errors = exc.errors()
        if drop_bad_labels and all(e["loc"][:1] == ("label_names",) for e in errors):
            return check_cfg({k: v for k, v in cfg.items() if k != "label_names"})
        err = errors[0]
        where = ".".join(str(p) for p in err["loc"]) or "pretrained_cfg"
        raise ValueError(f"{where!r}: {err['msg']}") from None
