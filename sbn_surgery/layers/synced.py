"""Training statistics pooled over the ranks of a ``torch.distributed`` group."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .checks import _stat_dtype
from .spectral import _hermitian_full

__all__: list[str] = []  # package-private: see sbn_surgery.layers


def _sync_over(process_group: Optional[object]) -> bool:
    """Whether ``process_group`` asks for synchronization and there are other ranks to pool with."""
    if process_group is None:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(_group(process_group)) > 1


def _group(process_group: object):
    return None if process_group == "world" else process_group  # None: the default group


def _synced_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float, stats: str, group):
    """Training with statistics pooled over the ranks of ``group``.

    Each rank sums its statistics and differentiable all-reduces pool them (one in channel mode;
    in frequency mode one for the mean, then one for the centred energy), so the input gradient
    sees every rank's outputs (as SyncBatchNorm's does) while parameter gradients stay local (DDP
    averages them). Returns (y, mu, var, pooled count, gain), gain the differentiable
    per-channel gain of prefix tokens (``functional._prefix_gain``) from the pooled statistics."""
    from torch.distributed.nn.functional import all_reduce

    n, c, h, w = x.shape
    if stats == "channel" and h * w == 1:
        # One pixel, one frequency: channel mode is frequency mode, whose centred variance does
        # not cancel under a large mean as E[x^2] - mu^2 would.
        y, mean, var, count, gain = _synced_train(x, weight, bias, eps, "frequency", group)
        return y, mean.view(c), var.view(c), count, gain
    sd = _stat_dtype(x)
    xs = x.to(sd)
    root = math.sqrt(h * w)
    n_all = all_reduce(torch.tensor([float(n)], dtype=sd, device=x.device), group=group)
    n_all = n_all.detach()
    if stats == "channel":
        local = torch.cat([xs.square().sum(dim=(0, 2, 3)), xs[:, :, 0, 0].sum(0)])
        pooled = all_reduce(local, group=group)
        q = pooled[:c] / (n_all * h * w)
        mu = pooled[c:] / (n_all * root)
        var = q - mu * mu
        scale = weight.to(sd) * torch.rsqrt(var + eps)
        shift = root * (bias.to(sd) - scale * mu)
        y = xs * scale.view(1, c, 1, 1)
        corner = torch.zeros(1, 1, h, w, dtype=sd, device=x.device)
        corner[..., 0, 0] = 1.0
        y = y + shift.view(1, c, 1, 1) * corner
        return y.to(x.dtype), mu.detach(), var.detach(), int(n_all.item()) * h * w, scale
    # Two reductions, the mean first: the variance then comes from the centred spectrum, not as
    # E|X|^2 - |mu|^2, which cancels catastrophically at the DC bin under a large mean.
    spatial_mean = all_reduce(xs.sum(0), group=group) / n_all
    diff = torch.fft.rfft2(xs - spatial_mean, norm="ortho")
    energy = (diff.real.square() + diff.imag.square()).sum(0)
    var_half = all_reduce(energy, group=group) / n_all
    scale = weight.to(sd).view(-1, 1, 1) * torch.rsqrt(var_half + eps)
    out = diff * scale + bias.to(sd).view(-1, 1, 1)
    y = torch.fft.irfft2(out, s=(h, w), norm="ortho")
    # mean of the variance over the full spectrum: bins 1..W'-1 (not W/2) stand for two
    wts = torch.full((w // 2 + 1,), 2.0, dtype=sd, device=x.device)
    wts[0] = 1.0
    if w % 2 == 0:
        wts[-1] = 1.0
    gain = weight.to(sd) * torch.rsqrt((var_half * wts).sum(dim=(1, 2)) / (h * w) + eps)
    return (y.to(x.dtype), spatial_mean.detach(), _hermitian_full(var_half.detach(), w),
            int(n_all.item()), gain)
