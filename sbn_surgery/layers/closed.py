"""Channel-mode SBN in closed form: no FFT, with a hand-written backward (see the package
docstring for the formula)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import _stat_dtype

__all__: list[str] = []  # package-private: see sbn_surgery.layers


class _ChannelSBNTrain(torch.autograd.Function):
    """Training-mode channel SBN with batch statistics and a fused, hand-written backward.
    Returns (y, mu, var, scale); the per-channel scale gamma / sqrt(var + eps) is differentiable
    (prefix tokens are multiplied by it), mu and var are not."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):  # type: ignore[override]
        n, c, h, w = x.shape
        sd = _stat_dtype(x)
        xs = x if x.dtype == sd else x.to(sd)
        m = n * h * w
        root = math.sqrt(h * w)
        # E[x^2] per channel in one reduction; the 2-norm kernel reads x once, with no temporary.
        # mu^2 = E_n[x00]^2 / (H*W) is a small part of it unless pixel (0, 0) carries most of the
        # energy, as on 1x1 maps, which _channel_train_1x1 takes instead.
        q = torch.linalg.vector_norm(xs, 2, dim=(0, 2, 3)).square_().div_(m)
        a = xs[:, :, 0, 0].mean(0)  # E_n[x00]
        mu = a / root
        var = q - mu * mu
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(sd) * rstd
        y = xs * scale.view(1, c, 1, 1)
        y[:, :, 0, 0] += root * (bias.to(sd) - scale * mu)
        ctx.save_for_backward(x, weight, rstd, mu)
        ctx.mark_non_differentiable(mu, var)
        # scale is an output too: prefix tokens (layout "tokens") are multiplied by it
        return y.to(x.dtype), mu, var, scale

    @staticmethod
    def backward(ctx, gy: Tensor, _gmu, _gvar, gscale):  # type: ignore[override]
        x, weight, rstd, mu = ctx.saved_tensors
        n, c, h, w = x.shape
        sd = rstd.dtype
        xs = x if x.dtype == sd else x.to(sd)
        g = gy if gy.dtype == sd else gy.to(sd)
        m = n * h * w
        root = math.sqrt(h * w)
        gamma = weight.to(sd)
        g0 = g[:, :, 0, 0].sum(0)  # sum_n g at pixel (0, 0)
        gx = _channel_dot(g, xs)  # sum_{n,h,w} g * x
        p = gx - root * mu * g0  # dL/d(scale)
        if gscale is not None:  # the scale's own uses (prefix tokens)
            p = p + gscale.to(sd)
        grad_w = rstd * p if ctx.needs_input_grad[1] else None
        grad_b = root * g0 if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            scale = gamma * rstd
            r3p = gamma * rstd * rstd * rstd * p
            k = -r3p / m
            c0 = (r3p * mu - root * scale * g0) / (n * root)
            grad_x = g * scale.view(1, c, 1, 1)
            grad_x.addcmul_(xs, k.view(1, c, 1, 1))
            grad_x[:, :, 0, 0] += c0
            grad_x = grad_x.to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def _channel_train_1x1(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """Training-mode channel SBN on 1x1 maps, where it is BatchNorm: torch's batch norm, whose
    centred statistics do not cancel under a large mean as E[x^2] - mu^2 does."""
    sd = _stat_dtype(x)
    xs = x if x.dtype == sd else x.to(sd)
    var, mu = torch.var_mean(xs, dim=(0, 2, 3), unbiased=False)
    y = F.batch_norm(xs, None, None, weight.to(sd), bias.to(sd), training=True, eps=eps)
    scale = weight.to(sd) * torch.rsqrt(var + eps)  # differentiable, for prefix tokens
    return y.to(x.dtype), mu.detach(), var.detach(), scale


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over (N, H, W) of a * b, per channel."""
    n, c, h, w = a.shape
    if a.is_contiguous() and b.is_contiguous():
        # (N*C) dot products of length H*W as a batched matrix product: no temporary tensor.
        dots = torch.bmm(a.reshape(n * c, 1, h * w), b.reshape(n * c, h * w, 1))
        return dots.view(n, c).sum(0)
    return (a * b).sum((0, 2, 3))


def _channel_closed_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                          eps: float) -> Tensor:
    """Channel SBN with given (running) statistics: a per-channel scale plus a one-pixel term."""
    n, c, h, w = x.shape
    sd = _stat_dtype(x)
    root = math.sqrt(h * w)
    scale = weight.to(sd) * torch.rsqrt(var.to(sd) + eps)
    shift = root * (bias.to(sd) - scale * mean.to(sd))
    xs = x if x.dtype == sd else x.to(sd)
    y = xs * scale.view(1, c, 1, 1)
    y[:, :, 0, 0] += shift
    return y.to(x.dtype)
