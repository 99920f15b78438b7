"""``spectral_batch_norm``, the functional form: statistics, the path for them, running updates."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import (_check_input, _check_train_count, _frequency_impl, _per_channel,
                     _resolve_impl, _same_format, _stat_dtype)
from .closed import _ChannelSBNTrain, _channel_closed_apply, _channel_train_1x1
from .lastdim import _channel_last_apply, _ChannelLastSBNTrain
from .matmul import _frequency_matmul_eval, _frequency_matmul_train
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
    place with factor ``momentum`` (unbiased variance, as ``batch_norm`` does), unless the batch
    statistics are not finite: such a batch leaves them as they were. ``training=False`` uses
    ``running_mean``/``running_var``. Shapes of the buffers: (C,) in channel mode; (C, H, W)
    in frequency mode, ``running_mean`` holding the spatial-domain mean (see module docstring).

    ``process_group`` (training only): pool the batch statistics over the ranks of that
    ``torch.distributed`` group (``"world"`` for the default group), as ``SyncBatchNorm`` does.
    """
    return _sbn_forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                        stats, impl, process_group)[0]


def _sbn_forward(x, running_mean, running_var, weight, bias, training, momentum, eps, stats, impl,
                 process_group, want_gain=False):
    """``spectral_batch_norm``, also returning whether the running statistics took this batch
    (a 0-d bool tensor; None when nothing was to update) and, when ``want_gain``, the per-channel
    gain of prefix tokens (:func:`_prefix_gain`; None otherwise), differentiable in training.
    ``momentum`` may be a 0-d tensor."""
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
    if training:
        _check_train_count(x, stats)
    if stats == "frequency":
        path = _frequency_impl(path, h, w)
    sd = _stat_dtype(x)
    weight = _per_channel(weight, c, x.new_empty(0, dtype=sd), 1.0)
    bias = _per_channel(bias, c, x.new_empty(0, dtype=sd), 0.0)

    if not training:
        gain = _prefix_gain(running_var, weight, eps, stats) if want_gain else None
        return _sbn_eval(x, running_mean, running_var, weight, bias, eps, stats, path), None, gain

    count = n * h * w if stats == "channel" else n
    gain = None
    if _sync_over(process_group):
        y, mu, var_b, count, gain = _synced_train(x, weight, bias, eps, stats,
                                                  _group(process_group))
    elif path == "closed" and h * w == 1:
        y, mu, var_b, gain = _channel_train_1x1(x, weight, bias, eps)
    elif path == "closed":
        y, mu, var_b, gain = _ChannelSBNTrain.apply(x, weight, bias, eps)
    elif path == "matmul":
        y, mu, var_b = _frequency_matmul_train(x, weight, bias, eps)
    elif stats == "channel":
        y, mu, var_b, gain = _channel_fft(x, None, None, weight, bias, eps)
    else:
        y, mu, var_b = _frequency_fft(x, None, None, weight, bias, eps)
    if want_gain and gain is None:  # frequency mode
        gain = _frequency_train_gain(x, weight, eps)
    y = _same_format(y, x)
    gain = gain if want_gain else None
    if running_mean is None or running_var is None:
        return y, None, gain
    return y, _update_running(running_mean, running_var, mu, var_b, count, momentum), gain


def _sbn_forward_last(x, prefix, running_mean, running_var, weight, bias, training, momentum,
                      eps):
    """Channel mode in closed form on (N, P + L, C), channels last (lastdim.py): the output and
    whether the running statistics took the batch, as :func:`_sbn_forward`."""
    n, tokens, c = x.shape
    sd = _stat_dtype(x)
    weight = _per_channel(weight, c, x.new_empty(0, dtype=sd), 1.0)
    bias = _per_channel(bias, c, x.new_empty(0, dtype=sd), 0.0)
    if not training:
        return _channel_last_apply(x, running_mean, running_var, weight, bias, eps, prefix), None
    y, mu, var_b = _ChannelLastSBNTrain.apply(x, weight, bias, eps, prefix)
    if running_mean is None or running_var is None:
        return y, None
    count = n * (tokens - prefix)
    return y, _update_running(running_mean, running_var, mu, var_b, count, momentum)


def _sbn_eval(x, running_mean, running_var, weight, bias, eps, stats, path) -> Tensor:
    """Eval mode: the running statistics, by ``path``."""
    if x.numel() == 0:
        return x.clone()  # an empty batch (N=0): torch.fft refuses empty transforms
    if path == "closed":
        return _channel_closed_apply(x, running_mean, running_var, weight, bias, eps)
    if path == "matmul":
        return _same_format(_frequency_matmul_eval(x, running_mean, running_var, weight, bias, eps),
                            x)
    fn = _channel_fft if stats == "channel" else _frequency_fft
    return _same_format(fn(x, running_mean, running_var, weight, bias, eps)[0], x)


def _prefix_gain(var: Tensor, weight: Tensor, eps: float, stats: str) -> Tensor:
    """gamma / sqrt(v + eps) per channel from the variance ``var``: the channel's variance in
    channel mode, its mean over all frequencies in frequency mode (the gain of a map whose
    spectrum is flat). Prefix tokens (layout ``tokens``) are multiplied by it."""
    v = var.to(weight.dtype)
    if stats == "frequency":
        v = v.mean(dim=(-2, -1))
    return weight * torch.rsqrt(v + eps)


def _frequency_train_gain(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`_prefix_gain` of a training batch in frequency mode, differentiable: the mean over
    all frequencies of E_n|X - mu|^2 is, by Parseval, the mean over pixels of the batch variance
    of each pixel."""
    xs = x.to(weight.dtype)
    var = xs.var(dim=0, unbiased=False).mean(dim=(-2, -1))
    return weight * torch.rsqrt(var + eps)


def _update_running(running_mean: Tensor, running_var: Tensor, mu: Tensor, var_b: Tensor,
                    count: int, momentum) -> Tensor:
    """BatchNorm's update, skipped (without a host sync) when the batch statistics are not
    finite: one inf or NaN batch would otherwise poison the running statistics for good."""
    with torch.no_grad():
        unbiased = var_b * (count / (count - 1))
        finite = torch.isfinite(mu).all() & torch.isfinite(unbiased).all()
        for buf, new in ((running_mean, mu), (running_var, unbiased)):
            upd = buf * (1.0 - momentum) + new.to(buf.dtype) * momentum
            buf.copy_(torch.where(finite, upd.to(buf.dtype), buf))
    return finite
