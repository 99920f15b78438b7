"""Input checks and the small helpers every SBN path shares."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["STATS_MODES", "IMPLS"]


STATS_MODES = ("channel", "frequency")
IMPLS = ("auto", "fft", "closed")


def _check_input(x: Tensor, num_features: Optional[int]) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"SpectralBatchNorm2d expects a 4-D input (N, C, H, W); got shape {tuple(x.shape)} "
            f"({x.dim()}-D)"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"SpectralBatchNorm2d expects a floating-point input; got dtype {x.dtype} with shape "
            f"{tuple(x.shape)}. Convert it with .float()."
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"SpectralBatchNorm2d expects {num_features} channels, input shape "
            f"(N, {num_features}, H, W); got shape {tuple(x.shape)} with {x.shape[1]} channels"
        )


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _resolve_impl(stats: str, impl: str) -> str:
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}; got {stats!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "closed" and stats != "channel":
        raise ValueError(
            "impl='closed' exists for stats='channel' only; frequency mode needs the FFT "
            "(use impl='fft' or 'auto')"
        )
    if impl == "auto":
        return "closed" if stats == "channel" else "fft"
    return impl


def _per_channel(t: Optional[Tensor], c: int, like: Tensor, fill: float) -> Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=like.dtype, device=like.device)
    return t.to(like.dtype)


def _same_format(y: Tensor, x: Tensor) -> Tensor:
    """channels_last in, channels_last out (the FFT returns contiguous tensors)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y
