"""Channel-mode SBN in closed form on maps whose channels are the last axis: tokens
(N, P + L, C) and NHWC maps seen as (N, H*W, C), with no transpose and no copy.

The closed form (docs/sbn.md) is a per-channel scale ``s`` of every pixel plus one constant at
pixel (0, 0), the first patch token. The prefix tokens take the same scale and no constant, so
the whole tensor is ``y = s * x`` in one pass over memory, and ``y[:, P] += S * (beta - s * mu)``:
no slicing out of the patch tokens, no joining the prefix tokens back on. Only the statistics
(E[x^2] over the patch tokens, E_n[x at the first patch token]) look at the patch tokens alone.

Backward (as in ``closed.py``, with q = E[x^2], mu = E_n[x00] / S, var = q - mu^2,
r = rsqrt(var + eps)): the prefix tokens' share of dL/ds is sum g * x over them, so
p = dL/ds = sum over all tokens of g * x - S * mu * sum_n g00; dgamma = r * p; dbeta = S * sum_n
g00; dx = s * g on every token, minus gamma * r^3 * p / M * x on the patch tokens (M = N * L), plus
(gamma r^3 p mu - S s g00 sum) / (N S) at the first patch token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import _stat_dtype

__all__: list[str] = []  # package-private: see sbn_surgery.layers


class _ChannelLastSBNTrain(torch.autograd.Function):
    """Training-mode channel SBN on (N, P + L, C) with batch statistics of the L patch tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, prefix: int):  # type: ignore[override]
        n, _, c = x.shape
        sd = _stat_dtype(x)
        xs = x if x.dtype == sd else x.to(sd)
        patches = xs[:, prefix:]
        length = patches.shape[1]
        root = math.sqrt(length)
        # E[x^2] per channel: squaring into a contiguous temporary and summing over its rows
        # is several times faster on CPU than a 2-norm reduction over the leading axes
        q = patches.square().sum(dim=(0, 1)).div_(n * length)
        mu = xs[:, prefix].mean(0) / root
        var = q - mu * mu
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(sd) * rstd
        y = xs * scale
        y[:, prefix] += root * (bias.to(sd) - scale * mu)
        ctx.save_for_backward(x, weight, rstd, mu)
        ctx.prefix = prefix
        ctx.mark_non_differentiable(mu, var)
        return y.to(x.dtype), mu, var

    @staticmethod
    def backward(ctx, gy: Tensor, _gmu, _gvar):  # type: ignore[override]
        x, weight, rstd, mu = ctx.saved_tensors
        p0 = ctx.prefix
        n, tokens, c = x.shape
        length = tokens - p0
        sd = rstd.dtype
        xs = x if x.dtype == sd else x.to(sd)
        g = gy if gy.dtype == sd else gy.to(sd)
        m = n * length
        root = math.sqrt(length)
        g0 = g[:, p0].sum(0)
        gx = (g.reshape(-1, c) * xs.reshape(-1, c)).sum(0)  # every token: prefix tokens too
        p = gx - root * mu * g0
        grad_w = (rstd * p).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = (root * g0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            scale = weight.to(sd) * rstd
            r3p = weight.to(sd) * rstd * rstd * rstd * p
            grad_x = g * scale
            grad_x[:, p0:].addcmul_(xs[:, p0:], (-r3p / m))
            grad_x[:, p0] += (r3p * mu - root * scale * g0) / (n * root)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None


def _channel_last_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                        eps: float, prefix: int) -> Tensor:
    """Eval mode on (N, P + L, C): the per-channel scale on every token, the constant on the
    first patch token."""
    sd = _stat_dtype(x)
    root = math.sqrt(x.shape[1] - prefix)
    scale = weight.to(sd) * torch.rsqrt(var.to(sd) + eps)
    xs = x if x.dtype == sd else x.to(sd)
    y = xs * scale
    y[:, prefix] += root * (bias.to(sd) - scale * mean.to(sd))
    return y.to(x.dtype)
