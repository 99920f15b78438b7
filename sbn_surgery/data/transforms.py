"""Preprocessing per timm's data config, batch augmentation, and per-sample seeding.

The built-in sources are preprocessed a batch of uint8 tensors at a time (one interpolate, one
normalize); every other image (ImageFolder, timm's readers, WebDataset samples) goes through
timm's transforms, each under its own seed so that any image of any epoch can be reproduced (what
an exact ``--resume`` needs).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from .augment import seeded
from .images import load_image

# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
#: timm's eval data flags (resolve_data_config's keys besides input_size) and the training
#: ones (create_transform's arguments, under timm train.py's names).
EVAL_FLAGS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
TRAIN_FLAGS = ("scale", "ratio", "hflip", "vflip", "color_jitter", "train_interpolation")


def data_config_for(model: torch.nn.Module, input_size: Optional[Sequence[int]] = None,
                    in_chans: Optional[int] = None,
                    overrides: Optional[dict[str, Any]] = None) -> dict:
    """timm's data config for ``model`` (resize, interpolation, mean, std, crop), from its
    ``pretrained_cfg`` (the weights' preprocessing), at ``input_size`` ((C, H, W) or (H, W))
    when given; the channel count follows the model's ``in_chans``. ``overrides``: timm's eval
    flags given by the user (mean, std, interpolation, crop_pct, crop_mode; None: not given),
    which win; a mean or std of one value is used for every channel."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if len(size) == 2:
            size = (in_chans or 3,) + size
        if len(size) != 3 or min(size) < 1:
            raise DataError(f"--input-size expects C H W (e.g. 3 64 64); got {list(input_size)}")
        args["input_size"] = size
    cfg = dict(resolve_data_config(args, model=model))
    if in_chans is not None and cfg["input_size"][0] != in_chans:
        cfg["input_size"] = (in_chans,) + tuple(cfg["input_size"][1:])
    given = {k: v for k, v in (overrides or {}).items() if k in EVAL_FLAGS and v is not None}
    c = int(cfg["input_size"][0])
    for key in ("mean", "std"):
        if key in given:
            values = tuple(float(v) for v in given[key])
            if len(values) not in (1, c):
                raise DataError(f"--{key} has {len(values)} values; the model takes {c} input "
                                f"channel(s): give 1 value or {c}")
            given[key] = values * c if len(values) == 1 else values
    cfg.update(given)
    return fit_channels(cfg)


def train_transform_args(flags: dict[str, Any], interpolation: str) -> dict[str, Any]:
    """timm ``create_transform`` arguments of the training flags (see TRAIN_FLAGS; None: timm's
    default), the training resize at ``interpolation`` unless ``train_interpolation``."""
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in flags.items()
           if k in TRAIN_FLAGS and k != "train_interpolation" and v is not None}
    out["interpolation"] = flags.get("train_interpolation") or interpolation
    return out


def fit_channels(cfg: dict) -> dict:
    """Mean/std with one entry per input channel (timm keeps 3 for a 1-channel model)."""
    cfg = dict(cfg)
    c = int(cfg["input_size"][0])
    for key, fill in (("mean", 0.5), ("std", 0.5)):
        v = tuple(float(t) for t in cfg.get(key, (fill,) * c))
        if len(v) != c:
            v = (sum(v) / len(v),) * c
        cfg[key] = v
    return cfg


def prepare_batch(images: Tensor, cfg: dict, gen: Optional[torch.Generator] = None,
                  hflip: bool = False, extra: Any = None, seed: int = 0) -> Tensor:
    """uint8 (B, c, h, w) -> normalized float (B, C, H, W) at the config's size; with ``gen``,
    a random shift of up to 1/8 of the size (zero fill) and, if ``hflip``, a random flip; with
    ``extra`` (a :class:`~.augment.TensorAugment`), its auto-augment after the shift and its
    random erasing after the normalization, both under ``seed``."""
    c, h, w = (int(v) for v in cfg["input_size"])
    x = images.float().div_(255.0)
    if tuple(x.shape[-2:]) != (h, w):
        mode = {"bicubic": "bicubic", "nearest": "nearest-exact"}.get(
            cfg.get("interpolation", "bilinear"), "bilinear")
        smooth = dict(align_corners=False, antialias=True) if mode != "nearest-exact" else {}
        x = F.interpolate(x, size=(h, w), mode=mode, **smooth)
        x = x.clamp_(0.0, 1.0)
    if gen is not None:
        x = shift_flip(x, gen, hflip)
    if extra is not None:
        x = extra.images(x, seed)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:  # RGB to luminance (ITU-R 601), as PIL's convert("L")
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataError(f"images have {x.shape[1]} channels, the model expects {c}")
    mean = torch.tensor(cfg["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype).view(1, -1, 1, 1)
    x = ((x - mean) / std).contiguous()
    return x if extra is None else extra.erase(x, seed)


def shift_flip(x: Tensor, gen: torch.Generator, hflip: bool) -> Tensor:
    """Per-image integer translation (up to 1/8 of each side, zero fill) and optional h-flip."""
    b, _, h, w = x.shape
    max_dy, max_dx = h // 8, w // 8
    dy = torch.randint(-max_dy, max_dy + 1, (b,), generator=gen)
    dx = torch.randint(-max_dx, max_dx + 1, (b,), generator=gen)
    flip = (torch.rand(b, generator=gen) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    rows = torch.arange(h).view(1, h) - dy.view(b, 1)  # source row of each output row
    cols = torch.arange(w).view(1, w) - dx.view(b, 1)
    cols = torch.where(flip.view(b, 1), (w - 1) - cols, cols)
    valid = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
    ri = rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, x.shape[1], h, w)
    ci = cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = x.gather(2, ri).gather(3, ci)
    return out.masked_fill_(~valid, 0.0)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2,
               dtype=np.uint64)[0]) >> 1  # shift the Python int: numpy 1.x refuses uint64 >> int


class IndexedReader:
    """(PIL image, label) of sample ``index`` of a random-access split: an ImageFolder, a split
    with a ``load(index, channels)`` method (timm's readers, Hugging Face datasets), or a
    ``Subset`` of either. Picklable, so loader workers get their own."""

    def __init__(self, split: Any, channels: int) -> None:
        self.split = split
        self.channels = channels

    def __call__(self, index: int):
        base = self.split
        if isinstance(base, torch.utils.data.Subset):
            index, base = base.indices[index], base.dataset
        if hasattr(base, "load"):
            return base.load(index, self.channels)
        path, label = base.samples[index]
        return load_image(path, self.channels), label  # any failure: a DataError naming the file


class SeededImages(torch.utils.data.Dataset):
    """Samples keyed by (item, seed): ``read(item)`` gives (PIL image, label) and the
    transform's randomness comes from the seed (python ``random`` and torch, saved and restored
    around it), so any image is reproducible."""

    def __init__(self, read: Any, transform: Any) -> None:
        self.read = read
        self.transform = transform

    def __getitem__(self, key: tuple[Any, Optional[int]]):
        item, seed = key
        img, label = self.read(item)
        if seed is None:
            return self.transform(img), label
        with seeded(seed):
            return self.transform(img), label
