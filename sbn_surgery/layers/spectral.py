"""The FFT paths: the reference channel-mode path and frequency mode, through ``torch.fft``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import _stat_dtype

__all__ = ["frequency_scale"]


def _channel_fft(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], weight: Tensor,
                 bias: Tensor, eps: float):
    """Reference channel SBN through the full orthonormal spectrum. Returns (y, mu, var_b,
    scale), scale = gamma / sqrt(var + eps) differentiable."""
    sd = _stat_dtype(x)
    xs = x.to(sd)
    spec = torch.fft.fft2(xs, norm="ortho")
    if mean is None:
        mu_c = spec.mean(dim=(0, 2, 3))
        diff = spec - mu_c.view(1, -1, 1, 1)
        var_b = (diff.real.square() + diff.imag.square()).mean(dim=(0, 2, 3))
        mu = mu_c.real
    else:
        mu = mean.to(sd)
        var_b = var.to(sd)
        diff = spec - mu.view(1, -1, 1, 1)
    scale = weight.to(sd) * torch.rsqrt(var_b + eps)
    out = diff * scale.view(1, -1, 1, 1) + bias.to(sd).view(1, -1, 1, 1)
    y = torch.fft.ifft2(out, norm="ortho").real
    return y.to(x.dtype), mu.detach(), var_b.detach(), scale


def _hermitian_full(half: Tensor, width: int) -> Tensor:
    """Extend a (..., H, W//2+1) quantity that is symmetric under k -> -k to the full (..., H, W)."""
    h = half.shape[-2]
    wr = half.shape[-1]
    if width == wr:
        return half
    rows = (-torch.arange(h, device=half.device)) % h
    cols = width - torch.arange(wr, width, device=half.device)
    return torch.cat([half, half[..., rows, :][..., cols]], dim=-1)


def frequency_scale(var: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Per-frequency scale gamma / sqrt(var + eps), shape (C, H, W), made symmetric under
    k -> -k. Re(ifft2) keeps only the Hermitian part of the scaled spectrum, so for a Hermitian
    input spectrum a scale s acts exactly as (s(k) + s(-k)) / 2; statistics estimated from data
    are already symmetric and are left unchanged."""
    scale = weight.view(-1, 1, 1) * torch.rsqrt(var + eps)
    h, w = scale.shape[-2:]
    rows = (-torch.arange(h, device=scale.device)) % h
    cols = (-torch.arange(w, device=scale.device)) % w
    return 0.5 * (scale + scale[..., rows, :][..., cols])


def _frequency_fft(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], weight: Tensor,
                   bias: Tensor, eps: float):
    """Frequency SBN via the one-sided spectrum (exact: every statistic is per frequency, and the
    normalized spectrum stays Hermitian). Returns (y, spatial_mean, full_var)."""
    n, c, h, w = x.shape
    sd = _stat_dtype(x)
    xs = x.to(sd)
    # The DFT is linear, so X - mu is the transform of x minus its spatial mean: subtracting
    # before the transform avoids cancelling two large spectra in float32.
    if mean is None:
        spatial_mean = xs.mean(0)
        diff = torch.fft.rfft2(xs - spatial_mean, norm="ortho")
        var_half = (diff.real.square() + diff.imag.square()).mean(0)
        scale = weight.to(sd).view(-1, 1, 1) * torch.rsqrt(var_half + eps)
    else:
        spatial_mean = mean.to(sd)
        diff = torch.fft.rfft2(xs - spatial_mean, norm="ortho")
        var_half = var.to(sd)[..., : w // 2 + 1]
        scale = frequency_scale(var.to(sd), weight.to(sd), eps)[..., : w // 2 + 1]
    out = diff * scale + bias.to(sd).view(-1, 1, 1)
    y = torch.fft.irfft2(out, s=(h, w), norm="ortho")
    return y.to(x.dtype), spatial_mean.detach(), _hermitian_full(var_half.detach(), w)
