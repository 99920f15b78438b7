"""timm's eval preprocessing with Pillow and numpy alone.

:class:`EvalTransform` computes what ``timm.data.create_transform(**data_config)`` (with
``is_training=False``) computes for a PIL image, without torch: timm's
``transforms_imagenet_eval`` resizes (``crop_mode`` center: the shorter side to
``floor(size / crop_pct)``, or for a non-square target timm's ``ResizeKeepRatio``; squash: both
sides to ``floor(size / crop_pct)``; border: the longer side, with ``ResizeKeepRatio(longest=1)``)
with PIL's filter for the interpolation, crops the center (torchvision's ``center_crop``, which
pads with 0 where the crop is larger; border mode pads with the mean colour, timm's
``CenterCropOrPad``), scales to [0, 1] and normalizes with mean and std in float32. The resize
is PIL's own, on the same 8-bit image, so the result is timm's to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import ServingError
from ..imaging import MAX_PIXELS, resample_filter
from .metadata import DataConfig

__all__ = ["EvalTransform"]


class EvalTransform:
    """``transform(img)``: a PIL image (mode L or RGB, as the data config's channel count asks)
    -> float32 array (C, H, W), timm's eval transform for ``cfg``. A resize larger than
    ``MAX_PIXELS`` (what a small ``crop_pct`` of a large input size asks for) is refused before
    it allocates, and so is a channel count other than 1 or 3: one ServingError naming ``where``
    (the file the config came from)."""

    def __init__(self, cfg: DataConfig, where: str = "the data config") -> None:
        self.cfg = cfg
        self.where = where
        self.size = (int(cfg.input_size[1]), int(cfg.input_size[2]))
        self.resample = resample_filter(cfg.interpolation)
        self.scale_size = tuple(math.floor(x / cfg.crop_pct) for x in self.size)
        c = int(cfg.input_size[0])
        if c not in (1, 3):  # an image file gives L or RGB; nothing here makes other channels
            raise ServingError(f"{where}: the model takes {c}-channel input; serving reads "
                               "images as grayscale (1 channel) or RGB (3 channels). Run the "
                               "file with onnxruntime on arrays you prepare")
        self.mean = np.asarray(cfg.mean, dtype=np.float32).reshape(c, 1, 1)
        self.std = np.asarray(cfg.std, dtype=np.float32).reshape(c, 1, 1)
        self.fill = tuple(round(255 * v) for v in cfg.mean)  # timm's border-mode padding colour

    @property
    def mode(self) -> str:
        """The PIL mode images must have: L for a 1-channel model, else RGB."""
        return "L" if self.cfg.input_size[0] == 1 else "RGB"

    def __call__(self, img) -> np.ndarray:
        if img.mode != self.mode:
            img = img.convert(self.mode)
        img = self._resize(img, self._target(img))
        fill = self.fill if self.cfg.crop_mode == "border" else (0,) * len(self.fill)
        arr = _center_crop(_pixels(img), self.size, fill)
        x = arr.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return (x - self.mean) / self.std

    def _target(self, img) -> tuple[int, int]:
        """(H, W) timm's eval transform resizes ``img`` to, before its center crop."""
        if self.cfg.crop_mode == "squash":
            return self.scale_size  # type: ignore[return-value]
        if self.cfg.crop_mode == "border":
            return _keep_ratio(img, self.scale_size, 1.0)
        if self.scale_size[0] == self.scale_size[1]:
            return _shorter_side(img, self.scale_size[0])
        return _keep_ratio(img, self.scale_size, 0.0)

    def _resize(self, img, target: tuple[int, int]):
        if target[0] * target[1] > MAX_PIXELS:
            c = self.cfg
            raise ServingError(
                f"{self.where}: its data_config (input {c.input_size[1]}x{c.input_size[2]}, "
                f"crop_pct {c.crop_pct:g}, crop_mode {c.crop_mode}) resizes a {img.width}x"
                f"{img.height} image to {target[1]}x{target[0]}, more than {MAX_PIXELS} pixels; "
                "the file's preprocessing is implausible: export it again")
        return _resize(img, target, self.resample)


def _pixels(img) -> np.ndarray:
    """uint8 (H, W, C) of an L or RGB image."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize(img, size: Sequence[int], resample: int):
    """torchvision's ``resize`` of a PIL image to (H, W): nothing when the size is already right."""
    h, w = int(size[0]), int(size[1])
    if (img.height, img.width) == (h, w):
        return img
    return img.resize((w, h), resample)


def _shorter_side(img, side: int) -> tuple[int, int]:
    """torchvision's output size for ``Resize(side)``: the shorter side to ``side``, the longer
    side in proportion (truncated)."""
    h, w = img.height, img.width
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _keep_ratio(img, target: Sequence[int], longest: float) -> tuple[int, int]:
    """timm's ``ResizeKeepRatio.get_params`` without its random parts."""
    h, w = img.height, img.width
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h * 1.0 / ratio), round(w * 1.0 / ratio)


def _center_crop(arr: np.ndarray, size: tuple[int, int], fill: Sequence[int]) -> np.ndarray:
    """torchvision's ``center_crop`` (timm's ``center_crop_or_pad`` with ``fill``): pad to at
    least ``size`` (the extra pixel on the right and bottom), then crop the center."""
    ch, cw = size
    h, w = arr.shape[:2]
    if ch > h or cw > w:
        top, left = (ch - h) // 2 if ch > h else 0, (cw - w) // 2 if cw > w else 0
        bottom, right = (ch - h + 1) // 2 if ch > h else 0, (cw - w + 1) // 2 if cw > w else 0
        padded = np.empty((h + top + bottom, w + left + right, arr.shape[2]), dtype=arr.dtype)
        padded[:] = np.asarray(fill, dtype=arr.dtype).reshape(1, 1, -1)
        padded[top:top + h, left:left + w] = arr
        arr = padded
        h, w = arr.shape[:2]
        if (h, w) == (ch, cw):
            return arr
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return arr[top:top + ch, left:left + cw]
