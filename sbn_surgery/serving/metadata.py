"""What an exported file says about serving it: its eval preprocessing (timm's data config) and
the name of each output index, checked before use.

The values come from the file's metadata (``sbn_surgery.data_config``, ``sbn_surgery.classes``;
see :mod:`sbn_surgery.onnx_io`), which is untrusted: every field is checked for type, range and
size, and a problem is one :class:`~sbn_surgery.errors.ServingError` naming the file and the
field. Export writes them through the same checks, so a file it writes always reads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import ServingError
from ..imaging import INTERPOLATIONS

__all__ = ["DataConfig", "ServingInfo", "check_data_config", "check_classes", "read_serving_info",
           "CROP_MODES", "DEFAULT_CROP_PCT", "MAX_CLASSES", "MAX_SIDE"]

#: timm's eval crop modes (``transforms_imagenet_eval``) and its default crop fraction.
CROP_MODES = ("center", "squash", "border")
DEFAULT_CROP_PCT = 0.875
#: Bounds on what a file may ask for (far above any real model; a hostile file cannot make the
#: preprocessing allocate gigabytes or the table print megabytes).
MAX_CHANNELS = 16
MAX_SIDE = 4096
MAX_CLASSES = 100_000
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class DataConfig:
    """timm's eval data config (``timm.data.resolve_data_config``'s keys): what
    ``timm.data.create_transform(**cfg.to_json())`` builds for evaluation."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"

    def to_json(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _floats(value: Any, channels: int, what: str, where: str, positive: bool) -> tuple[float, ...]:
    if _finite(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(_finite(v) for v in value):
        raise ServingError(f"{where}: data_config {what} must be a list of finite numbers")
    if positive and min(value) <= 0:
        raise ServingError(f"{where}: data_config {what} must be > 0 (it divides the pixels)")
    if len(value) == 1:
        value = list(value) * channels
    if len(value) != channels:
        raise ServingError(f"{where}: data_config {what} has {len(value)} values for "
                           f"{channels} input channel(s)")
    return tuple(float(v) for v in value)


def check_data_config(cfg: Any, where: str) -> DataConfig:
    """A :class:`DataConfig` from a mapping (a file's ``data_config``, or timm's
    ``resolve_data_config``), every field checked; ``where`` names the source in errors.
    ``crop_pct``/``crop_mode`` left out (or None) take timm's defaults."""
    if isinstance(cfg, DataConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise ServingError(f"{where}: data_config is not a mapping; export the file again")
    size = cfg.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            and 1 <= size[0] <= MAX_CHANNELS and all(1 <= v <= MAX_SIDE for v in size[1:])):
        raise ServingError(f"{where}: data_config input_size must be [C, H, W] with C in "
                           f"1..{MAX_CHANNELS} and H, W in 1..{MAX_SIDE}")
    channels = int(size[0])
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in INTERPOLATIONS:
        raise ServingError(f"{where}: data_config interpolation must be one of "
                           f"{', '.join(INTERPOLATIONS)}")
    crop_pct = cfg.get("crop_pct")
    crop_pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
    if not (_finite(crop_pct) and 0.05 <= crop_pct <= 2.0):
        raise ServingError(f"{where}: data_config crop_pct must be a number in [0.05, 2]")
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in CROP_MODES:
        raise ServingError(f"{where}: data_config crop_mode must be one of {', '.join(CROP_MODES)}")
    return DataConfig(tuple(int(v) for v in size),  # type: ignore[arg-type]
                      _floats(cfg.get("mean", 0.5), channels, "mean", where, False),
                      _floats(cfg.get("std", 0.5), channels, "std", where, True),
                      str(interp), float(crop_pct), str(crop_mode))


def check_classes(names: Any, where: str, outputs: Optional[int] = None) -> list[str]:
    """Class names: a list of 1..MAX_CLASSES strings of at most MAX_NAME_CHARS characters, as
    many as the model has outputs (``outputs``, where known)."""
    if not isinstance(names, (list, tuple)) or not 1 <= len(names) <= MAX_CLASSES or \
            not all(isinstance(n, str) and len(n) <= MAX_NAME_CHARS for n in names):
        raise ServingError(f"{where}: classes must be a list of 1 to {MAX_CLASSES} names of at "
                           f"most {MAX_NAME_CHARS} characters")
    if outputs is not None and len(names) != outputs:
        raise ServingError(f"{where}: {len(names)} class names for {outputs} model outputs; "
                           "export the file again from the checkpoint that matches its data")
    return [str(n) for n in names]


@dataclass
class ServingInfo:
    """An exported file's serving metadata (checked), and the rest of what export recorded."""

    path: str
    data_config: DataConfig
    classes: list[str]
    classes_source: str = "indices"
    model_name: Optional[str] = None
    recipe_name: Optional[str] = None
    mode: Optional[str] = None
    version: Optional[str] = None
    sbn_stats: list[str] = field(default_factory=list)  # each SBN layer's statistics mode

    def to_json(self) -> dict[str, Any]:
        return {"onnx": self.path, "model_name": self.model_name, "recipe_name": self.recipe_name,
                "mode": self.mode, "version": self.version, "sbn_layers": len(self.sbn_stats),
                "sbn_stats": sorted(set(self.sbn_stats)), "data_config": self.data_config.to_json(),
                "num_classes": len(self.classes), "classes_source": self.classes_source}


def _text(meta: dict, key: str) -> Optional[str]:
    value = meta.get(key)
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else None


def read_serving_info(meta: dict[str, Any], path: Union[str, Path],
                      outputs: Optional[int] = None) -> ServingInfo:
    """The :class:`ServingInfo` of a file from its decoded metadata (``onnx_io.decode_metadata``);
    a file without a data config is refused (it was not written by this version's export).
    Without class names the classes are the output indices."""
    where = str(path)
    if "data_config" not in meta:
        raise ServingError(
            f"{where} has no preprocessing metadata (sbn_surgery.data_config): it was not written "
            "by `sbn-surgery export` (or by a version before it recorded one); export it again "
            "from its checkpoint")
    cfg = check_data_config(meta["data_config"], where)
    if meta.get("classes") is not None:
        classes = check_classes(meta["classes"], where, outputs)
        source = _text(meta, "classes_source") or "file"
    elif outputs is not None and 1 <= outputs <= MAX_CLASSES:
        classes, source = [str(i) for i in range(outputs)], "indices"
    else:
        raise ServingError(f"{where}: no class names and no fixed number of outputs")
    sites = meta.get("sites") if isinstance(meta.get("sites"), list) else []
    stats = [str(s.get("stats"))[:20] for s in sites[:10_000] if isinstance(s, dict)]
    return ServingInfo(where, cfg, classes, source, _text(meta, "model_name"),
                       _text(meta, "recipe_name"), _text(meta, "mode"), _text(meta, "version"),
                       stats)


def same_channels(cfg: DataConfig, channels: Optional[int], where: str) -> None:
    if channels is not None and channels != cfg.input_size[0]:
        raise ServingError(f"{where}: the graph takes {channels} input channel(s), its "
                           f"data_config {cfg.input_size[0]}; export the file again")


def sizes_agree(cfg: DataConfig, dims: Sequence[Optional[int]], where: str) -> None:
    """A fixed spatial size in the graph must be the data config's."""
    for d, v, name in zip(dims[2:4], cfg.input_size[1:], ("height", "width")):
        if d is not None and d != v:
            raise ServingError(f"{where}: the graph's input {name} is {d}, its data_config says "
                               f"{v}; export the file again")
