"""``spectral_batch_norm``, the functional form: statistics, the path for them, running updates."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import _check_input, _per_channel, _resolve_impl, _same_format, _stat_dtype
from .closed import _ChannelSBNTrain, _channel_closed_apply, _channel_train_1x1
from .spectral import _channel_fft, _frequency_fft
from .synced import _group, _sync_over, _synced_train

__all__ = ["spectral_batch_norm"]


def spectral_batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stats: str = "channel",
    impl: str = "auto",
    process_group: Optional[object] = None,
) -> Tensor:
    """Spectral batch normalization, the counterpart of ``torch.nn.functional.batch_norm``.

    ``training=True`` uses batch statistics and, when running buffers are given, updates them in
    place with factor ``momentum`` (unbiased variance, as ``batch_norm`` does). ``training=False``
    uses ``running_mean``/``running_var``. Shapes of the buffers: (C,) in channel mode; (C, H, W)
    in frequency mode, ``running_mean`` holding the spatial-domain mean (see module docstring).

    ``process_group`` (training only): pool the batch statistics over the ranks of that
    ``torch.distributed`` group (``"world"`` for the default group), as ``SyncBatchNorm`` does.
    """
    _check_input(x, None)
    path = _resolve_impl(stats, impl)
    n, c, h, w = x.shape
    if not training and (running_mean is None or running_var is None):
        raise ValueError("spectral_batch_norm: training=False needs running_mean and running_var")
    if not training and stats == "frequency" and tuple(running_var.shape[-2:]) != (h, w):
        raise ValueError(
            f"frequency-mode running statistics belong to spatial size "
            f"{tuple(running_var.shape[-2:])}; got input of spatial size {(h, w)} (shape "
            f"{tuple(x.shape)}). Evaluate at the calibrated size, or re-estimate the statistics at "
            f"this size."
        )
    count = n * h * w if stats == "channel" else n
    if training and count <= 1:
        raise ValueError(
            f"Expected more than 1 value per statistic when training, got input of shape "
            f"{tuple(x.shape)} ({count} value(s) per {'channel' if stats == 'channel' else 'channel and frequency'}); "
            f"use a larger batch or eval mode"
        )
    sd = _stat_dtype(x)
    weight = _per_channel(weight, c, x.new_empty(0, dtype=sd), 1.0)
    bias = _per_channel(bias, c, x.new_empty(0, dtype=sd), 0.0)

    if not training:
        if path == "closed":
            return _channel_closed_apply(x, running_mean, running_var, weight, bias, eps)
        fn = _channel_fft if stats == "channel" else _frequency_fft
        return _same_format(fn(x, running_mean, running_var, weight, bias, eps)[0], x)

    if _sync_over(process_group):
        y, mu, var_b, count = _synced_train(x, weight, bias, eps, stats, _group(process_group))
    elif path == "closed" and h * w == 1:
        y, mu, var_b = _channel_train_1x1(x, weight, bias, eps)
    elif path == "closed":
        y, mu, var_b = _ChannelSBNTrain.apply(x, weight, bias, eps)
    elif stats == "channel":
        y, mu, var_b = _channel_fft(x, None, None, weight, bias, eps)
    else:
        y, mu, var_b = _frequency_fft(x, None, None, weight, bias, eps)
    y = _same_format(y, x)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var_b * (count / (count - 1))
            running_mean.mul_(1.0 - momentum).add_(mu.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y
