"""timm's data flags, under timm's names, as fields of the run's options (see :mod:`.options`).

Eval preprocessing (every image the model sees, training images' normalization included):
``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``; left out, they come from the
weights (their ``pretrained_cfg``: a tag's, a snapshot's config.json, a converted file's
metadata), else from timm's config for the model. Training augmentation of images read through
timm's transforms (folders, ``--dataset``): ``scale``, ``ratio``, ``hflip``, ``vflip``,
``color_jitter``, ``train_interpolation``, handed to ``timm.data.create_transform`` as timm's
``train.py`` hands them; the built-in in-memory sources keep their shift (and flip) augmentation.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, model_validator

Interpolation = Literal["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"]
TrainInterpolation = Literal["random", "bilinear", "bicubic", "nearest", "box", "hamming",
                             "lanczos"]
CropMode = Literal["center", "squash", "border"]
PANEL = "Data (timm's flags)"


def option(default: Any, help: str, *, kind: str = "run", short: Optional[str] = None,
           metavar: Optional[str] = None, alias: Optional[str] = None, panel: str = "Run",
           **constraints: Any) -> Any:
    """A field of the run's options: ``None`` until resolved; ``default`` is what
    :func:`~.options.resolve` fills in."""
    extra = {"default": default, "kind": kind, "short": short, "metavar": metavar,
             "alias": alias, "panel": panel}
    return Field(None, description=help, json_schema_extra=extra, **constraints)


class DataOptions(BaseModel):
    """timm's data flags (see the module docstring); ``None``: not given."""

    mean: Optional[list[float]] = option(
        None, "Normalization mean, one value or one per channel, comma-separated (timm's "
        "--mean), e.g. 0.485,0.456,0.406. Default: the weights' (their pretrained_cfg), else "
        "timm's for the model.", metavar="M,...", strict=False, panel=PANEL)
    std: Optional[list[float]] = option(
        None, "Normalization std, like --mean (timm's --std). Default: the weights'.",
        metavar="S,...", strict=False, panel=PANEL)
    interpolation: Optional[Interpolation] = option(
        None, "Resize interpolation of the eval images (timm's --interpolation), and of the "
        "training images unless --train-interpolation. Default: the weights'.", panel=PANEL)
    crop_pct: Optional[float] = option(
        None, "Eval center-crop fraction of images read from files (timm's --crop-pct). "
        "Default: the weights'.", metavar="PCT", gt=0, le=4, panel=PANEL)
    crop_mode: Optional[CropMode] = option(
        None, "Eval crop of images read from files: center, squash or border (timm's). "
        "Default: the weights'.", panel=PANEL)
    scale: Optional[list[float]] = option(
        [0.08, 1.0], "Random-resized-crop area range of training images read from files, "
        "LO,HI (timm's --scale).", metavar="LO,HI", strict=False, panel=PANEL)
    ratio: Optional[list[float]] = option(
        [0.75, 4 / 3], "Random-resized-crop aspect-ratio range, LO,HI (timm's --ratio).",
        metavar="LO,HI", strict=False, panel=PANEL)
    hflip: Optional[float] = option(
        0.5, "Horizontal-flip probability of training images read from files (timm's --hflip).",
        metavar="P", ge=0, le=1, panel=PANEL)
    vflip: Optional[float] = option(
        0.0, "Vertical-flip probability of training images read from files (timm's --vflip).",
        metavar="P", ge=0, le=1, panel=PANEL)
    color_jitter: Optional[float] = option(
        0.4, "Color-jitter strength (brightness, contrast, saturation) of training images read "
        "from files, when --aa is not given (timm's --color-jitter).", metavar="F", ge=0, le=10,
        panel=PANEL)
    train_interpolation: Optional[TrainInterpolation] = option(
        None, "Resize interpolation of training images read from files; random: bilinear or "
        "bicubic at random (timm train.py's default). Default: --interpolation.", panel=PANEL)

    @model_validator(mode="after")
    def _check_data_flags(self) -> "DataOptions":
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and not (1 <= len(values) <= 64 and all(
                    math.isfinite(v) and abs(v) <= 1e3 for v in values)):
                raise ValueError(f"--{name} expects 1 to 64 finite numbers, comma-separated "
                                 f"(e.g. 0.485,0.456,0.406); got {_short(values)}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"--std values must be > 0; got {_short(self.std)}")
        for name, top in (("scale", 1.0), ("ratio", 100.0)):
            pair = getattr(self, name)
            if pair is not None and not (len(pair) == 2 and all(math.isfinite(v) for v in pair)
                                         and 0 < pair[0] <= pair[1] <= top):
                raise ValueError(f"--{name} expects LO,HI with 0 < LO <= HI <= {top:g}; got "
                                 f"{_short(pair)}")
        return self


def _short(values: list[float], limit: int = 60) -> str:
    """A list as an error shows it: cut at ``limit`` characters, with its length."""
    text = repr(values)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(values)} values)"


def order_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The run's fields in reading order (the CLI's, args.yaml's): these flags (a base class,
    so first in pydantic's order) after the run's own options, before the Execution panel."""
    own = [k for k in fields if k not in DataOptions.model_fields]
    cut = next((i for i, k in enumerate(own)
                if fields[k].json_schema_extra["panel"] == "Execution"), len(own))
    order = own[:cut] + list(DataOptions.model_fields) + own[cut:]
    return {k: fields[k] for k in order}
