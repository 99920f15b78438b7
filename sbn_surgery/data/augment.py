"""timm's ``--aa`` (AutoAugment / RandAugment / AugMix strings) and ``--reprob`` (random erasing)
for the in-memory sources, and the checks of both options.

Images that go through timm's transforms (folders, tar archives, Hugging Face datasets,
WebDataset shards) get both from ``timm.data.create_transform(..., auto_augment=aa,
re_prob=reprob)``. The in-memory sources (digits, Fashion-MNIST, synthetic) are preprocessed a
batch of tensors at a time; for them :class:`TensorAugment` takes the same two pieces from timm's
factory: the auto-augment policy (the "secondary" stage of ``create_transform(separate=True)``)
runs on each resized image as a PIL image under that image's own seed, and timm's
``RandomErasing`` runs on the normalized batch under the batch's seed. Both draw from python's
``random``, numpy's and torch's global generators, which are seeded for the call and restored
after it, so the result is a function of (seed, epoch, rank, batch) like every other random choice here.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

__all__ = ["TensorAugment", "check_aa", "check_reprob", "keep_zero_bit_posterize", "seeded"]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python's ``random``, numpy's and torch's global generators for the block, then
    restore them: timm's transforms draw from all three (RandAugment picks its operations with
    numpy), and the caller's streams must not move."""
    t_state, p_state, n_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(t_state)
        random.setstate(p_state)
        np.random.set_state(n_state)


def _posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, where keeping 0 bits gives a black image.

    timm's policies ask for 0 bits at their extremes (``inc1`` at magnitude 10, which magnitude
    noise such as ``mstd0.5`` reaches; ``v0``'s posterize at level 2), meaning "keep no bits".
    Pillow 13 (and other recent releases) refuses ``bits < 1`` where older ones returned the
    black image, so timm's own op stops an epoch with a ValueError at a random image."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def keep_zero_bit_posterize(transform):
    """``transform`` (timm's: any nesting of Compose, RandAugment, AutoAugment, AugMix) with each
    posterize op calling :func:`_posterize`; changed in place and returned."""
    from timm.data import auto_augment

    timm_op = getattr(auto_augment, "posterize", None)
    stack, seen = [transform], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            stack.extend(obj)
            continue
        if timm_op is not None and getattr(obj, "aug_fn", None) is timm_op:
            obj.aug_fn = _posterize
        stack.extend(getattr(obj, attr, None) or () for attr in ("transforms", "ops", "policy"))
    return transform


def _aa_stage(aa: str, size: int, mean: tuple[float, ...], interpolation: str):
    """timm's auto-augment stage for ``aa`` (raises what timm raises on a bad string)."""
    from timm.data import create_transform

    _, secondary, _ = create_transform(size, is_training=True, auto_augment=aa, hflip=0.0,
                                       vflip=0.0, mean=mean, interpolation=interpolation,
                                       separate=True)
    return keep_zero_bit_posterize(secondary)


def check_aa(aa: Optional[str]) -> Optional[str]:
    """``aa`` if timm accepts it (None or '' for none); else a DataError naming ``--aa``."""
    if aa is None or not str(aa).strip():
        return None
    aa = str(aa).strip()
    try:
        _aa_stage(aa, 32, (0.5, 0.5, 0.5), "bilinear")
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise DataError(
            f"--aa {aa!r} is not an augmentation timm knows ({detail}); use a RandAugment string "
            f"such as rand-m9-mstd0.5 or rand-m7-n2, an AutoAugment policy (original, v0, "
            f"3a) or augmix-m5-w3"
        ) from None
    return aa


def check_reprob(reprob: float) -> float:
    """``reprob`` as a float in [0, 1]; else a DataError naming ``--reprob``."""
    try:
        p = float(reprob)
    except (TypeError, ValueError):
        raise DataError(f"--reprob must be a number in [0, 1]; got {reprob!r}") from None
    if not 0.0 <= p <= 1.0:  # also refuses nan
        raise DataError(f"--reprob is the probability of erasing a rectangle of a training "
                        f"image, a number in [0, 1]; got {reprob}")
    return p


class TensorAugment:
    """``aa`` and ``reprob`` for batches of in-memory images.

    :meth:`images` takes float images in [0, 1] at the input size (B, c, H, W), c = 1 or 3, and
    returns them auto-augmented, image ``j`` under ``seed_of(batch seed, j)``; :meth:`erase`
    takes the normalized batch and erases rectangles under the batch seed.
    """

    def __init__(self, aa: Optional[str], reprob: float, cfg: dict) -> None:
        self.aa = check_aa(aa)
        self.reprob = check_reprob(reprob)
        size = int(cfg["input_size"][-1])
        mean = tuple(cfg["mean"])
        mean3 = mean if len(mean) == 3 else (sum(mean) / len(mean),) * 3
        interpolation = cfg.get("interpolation", "bilinear")
        self._policy = _aa_stage(self.aa, size, mean3, interpolation) if self.aa else None
        self._eraser = None
        if self.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            # the defaults create_transform uses: per-pixel normal noise, one rectangle
            self._eraser = RandomErasing(self.reprob, mode="pixel", max_count=1, device="cpu")

    @property
    def active(self) -> bool:
        return self._policy is not None or self._eraser is not None

    def images(self, x: Tensor, seed: int) -> Tensor:
        if self._policy is None:
            return x
        from PIL import Image

        from .transforms import seed_of

        gray = x.shape[1] == 1
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.expand(-1, 3, -1, -1) if gray else arr
        out = torch.empty_like(x)
        for j in range(x.shape[0]):
            img = Image.fromarray(arr[j].permute(1, 2, 0).contiguous().numpy(), "RGB")
            with seeded(seed_of(seed, j)):
                img = self._policy(img)
            if gray:  # luminance again, as PIL's convert("L")
                img = img.convert("L")
            a = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
            a = a.unsqueeze(0) if gray else a.permute(2, 0, 1)
            out[j] = a.to(x.dtype) / 255.0
        return out

    def erase(self, x: Tensor, seed: int) -> Tensor:
        if self._eraser is None:
            return x
        with seeded(seed):
            return self._eraser(x)
