"""Input checks and the small helpers every SBN path shares."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["STATS_MODES", "IMPLS"]


STATS_MODES = ("channel", "frequency")
IMPLS = ("auto", "fft", "closed", "matmul")


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
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(
            f"SpectralBatchNorm2d expects a non-empty spatial size (H, W >= 1); got shape "
            f"{tuple(x.shape)}"
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
    if impl == "matmul" and stats != "frequency":
        raise ValueError(
            "impl='matmul' exists for stats='frequency' only; channel mode has the closed form "
            "(use impl='closed' or 'auto')"
        )
    if impl == "auto" and stats == "channel":
        return "closed"
    return impl  # frequency mode: "auto" is settled per input size by _frequency_impl


#: impl="auto" in frequency mode takes the matmul DFT for maps whose sides are at most this, the
#: FFT above. Measured on CPU (2 cores shared with other load, load average 5-9, 1 thread; median
#: process CPU time of forward+backward over BatchNorm2d's, batch 16, two runs):
#:   MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 python
#:   benchmarks/layer.py --stats frequency --batch 16 --threads 1 --repeats 7 --input-size 128
#:   (and --input-size 224)
#: matmul / fft: 2.2-2.6 / 12.2-12.7 at 4x4, 3.3-3.5 / 9.1-10.7 at 7x7, 3.3-4.4 / 9.0-10.6 at
#: 8x8, 6.6-8.1 / 8.6-9.4 at 14x14, 6.6 / 7.5-8.4 at 16x16, 9.1 / 10.0-10.4 at 28x28, 8.2-8.9 /
#: 8.8-9.1 at 32x32, 11.4-11.7 / 9.5-10.0 at 56x56. On CUDA the products run on tensor cores; the
#: same bound is used there unmeasured (no GPU here): benchmarks/gpu_check.sh reports both paths at
#: 4..64.
AUTO_MATMUL_MAX_SIDE = 32


def _frequency_impl(impl: str, h: int, w: int) -> str:
    """The frequency-mode path for an (H, W) input: "fft" or "matmul"."""
    if impl != "auto":
        return impl
    return "matmul" if max(h, w) <= AUTO_MATMUL_MAX_SIDE else "fft"


def _check_train_count(x: Tensor, stats: str) -> None:
    n, _, h, w = x.shape
    count = n * h * w if stats == "channel" else n
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per statistic when training, got input of shape "
            f"{tuple(x.shape)} ({count} value(s) per "
            f"{'channel' if stats == 'channel' else 'channel and frequency'}); use a larger "
            f"batch or eval mode"
        )


def _check_momentum(momentum) -> None:
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
            or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"SpectralBatchNorm2d momentum must be None (cumulative average) or a number in "
            f"[0, 1]; got {momentum!r}"
        )


def _per_channel(t: Optional[Tensor], c: int, like: Tensor, fill: float) -> Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=like.dtype, device=like.device)
    return t.to(like.dtype)


def _same_format(y: Tensor, x: Tensor) -> Tensor:
    """channels_last in, channels_last out (the FFT returns contiguous tensors)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y
