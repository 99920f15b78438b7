"""Figures of one feature map: RMS, max |x|, top-frequency share, normalized spectral entropy."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["spectral_stats", "feature_stats"]


def spectral_stats(x: Tensor) -> tuple[Optional[float], Optional[float], int]:
    """(mean top-frequency share, mean normalized spectral entropy, maps counted) of a 4-D
    tensor, over its (sample, channel) maps of non-zero, finite energy, from the full
    orthonormal fft2 spectrum. (None, None, 0) for single-pixel maps or when no map counts.

    Each map is divided by its own max |x| first: the figures do not depend on scale, and an
    exploded feature map cannot overflow the float32 power spectrum."""
    if x.dim() != 4:
        raise ValueError(f"spectral_stats expects (N, C, H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h * w < 2:
        return None, None, 0
    xs = x.detach()
    xs = xs.to(torch.float64 if xs.dtype == torch.float64 else torch.float32)
    peak = xs.abs().amax(dim=(-2, -1))  # (N, C); nan/inf for a non-finite map
    keep = torch.isfinite(peak) & (peak > 0)
    count = int(keep.sum())
    if count == 0:
        return None, None, 0
    xs = xs[keep] / peak[keep].view(-1, 1, 1)  # (maps, H, W), max |x| = 1
    power = torch.fft.fft2(xs, norm="ortho").abs().square().flatten(-2)  # (maps, H*W)
    p = power / power.sum(-1, keepdim=True)  # rows sum to 1
    share = p.amax(-1).double().mean().item()
    entropy = (-torch.special.xlogy(p, p).sum(-1).double() / math.log(h * w)).mean().item()
    return share, entropy, count


def feature_stats(x: Tensor) -> dict[str, Optional[float]]:
    """rms, max_abs, top_freq_share and spectral_entropy of one output (see module docstring)."""
    acc = _Accumulator()
    acc.add(x)
    return acc.figures()


class _Accumulator:
    """Running figures of one probe point over several forward calls. ``to_map`` gives the
    (N, C, H, W) map an output holds (tokens on their grid, NHWC permuted), or None; without it
    a 4-D output is taken as NCHW."""

    def __init__(self, to_map: Optional[Callable[[Tensor], Optional[Tensor]]] = None) -> None:
        self.to_map = to_map
        self.sumsq = 0.0
        self.count = 0
        self.max_abs = 0.0
        self.share_sum = 0.0
        self.entropy_sum = 0.0
        self.maps = 0
        self.shape: Optional[tuple[int, ...]] = None
        self.nonfinite = False

    def add(self, out: Any) -> None:
        x = _first_tensor(out)
        if x is None:
            return
        x = x.detach()
        self.shape = tuple(x.shape[1:])
        if x.numel() == 0:
            return
        xs = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        peak = xs.abs().amax().item()
        self.count += xs.numel()
        if not math.isfinite(peak):
            self.nonfinite = True
            self.sumsq = self.max_abs = float("inf")
        elif peak > 0:
            # sum of squares of x / peak (no overflow), scaled back in Python's float64
            norm = torch.linalg.vector_norm(xs / peak).item()
            self.sumsq += (norm * peak) ** 2
            self.max_abs = max(self.max_abs, peak)
        grid = self.to_map(xs) if self.to_map is not None else (xs if xs.dim() == 4 else None)
        if grid is not None:
            share, entropy, maps = spectral_stats(grid)
            if maps:
                self.share_sum += share * maps
                self.entropy_sum += entropy * maps
                self.maps += maps

    def figures(self) -> dict[str, Optional[float]]:
        return {
            "rms": math.sqrt(self.sumsq / self.count) if self.count else float("nan"),
            "max_abs": self.max_abs,
            "top_freq_share": self.share_sum / self.maps if self.maps else None,
            "spectral_entropy": self.entropy_sum / self.maps if self.maps else None,
        }


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    return None
