"""Spectral Batch Normalization (see shared/SBN.md for the definition implemented here).

Two statistics modes:

* ``channel``: one complex mean and one real variance per channel, pooled over the batch and all
  H*W frequencies of the orthonormal 2-D DFT.
* ``frequency``: one mean and one variance per channel and frequency, over the batch alone.

Two paths:

* ``fft``: the reference, written with ``torch.fft`` exactly as the definition reads.
* ``closed`` (channel mode only): the closed form. With S = sqrt(H*W) and x00 the pixel (0, 0),
  mu = E_n[x00] / S, var = E[x^2] - mu^2 (Parseval), and
  y = s * x + S * (beta - s * mu) at pixel (0, 0) only, with s = gamma / sqrt(var + eps).
  No FFT, one reduction and one elementwise pass, with a hand-written backward.

Buffers follow ``nn.BatchNorm2d``: ``running_mean``, ``running_var``, ``num_batches_tracked``.
In channel mode both statistics have shape (C,). In frequency mode ``running_mean`` is the
batch mean in the *spatial* domain, shape (C, H, W): its DFT is the complex per-frequency mean,
so it is stored exactly as a real tensor, and an exponential average in one domain is the same
in the other. ``running_var`` has shape (C, H, W), one real variance per frequency of the full
spectrum. Before the first training step they have shape (C, 0, 0) unless ``spatial_size`` was
given.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["SpectralBatchNorm2d", "spectral_batch_norm", "sync_sbn_stats", "STATS_MODES", "IMPLS"]

STATS_MODES = ("channel", "frequency")
IMPLS = ("auto", "fft", "closed")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# channel mode, closed form
# --------------------------------------------------------------------------------------------
class _ChannelSBNTrain(torch.autograd.Function):
    """Training-mode channel SBN with batch statistics and a fused, hand-written backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):  # type: ignore[override]
        n, c, h, w = x.shape
        sd = _stat_dtype(x)
        xs = x if x.dtype == sd else x.to(sd)
        m = n * h * w
        root = math.sqrt(h * w)
        # E[x^2] per channel in one reduction; the 2-norm kernel reads x once, with no temporary.
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
        return y.to(x.dtype), mu, var

    @staticmethod
    def backward(ctx, gy: Tensor, _gmu, _gvar):  # type: ignore[override]
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


# --------------------------------------------------------------------------------------------
# FFT paths
# --------------------------------------------------------------------------------------------
def _channel_fft(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], weight: Tensor,
                 bias: Tensor, eps: float):
    """Reference channel SBN through the full orthonormal spectrum. Returns (y, mu, var_b)."""
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
    return y.to(x.dtype), mu.detach(), var_b.detach()


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
    averages them). Returns (y, mu, var, pooled count)."""
    from torch.distributed.nn.functional import all_reduce

    n, c, h, w = x.shape
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
        return y.to(x.dtype), mu.detach(), var.detach(), int(n_all.item()) * h * w
    # Two reductions, the mean first: the variance then comes from the centred spectrum, not as
    # E|X|^2 - |mu|^2, which cancels catastrophically at the DC bin under a large mean.
    spatial_mean = all_reduce(xs.sum(0), group=group) / n_all
    diff = torch.fft.rfft2(xs - spatial_mean, norm="ortho")
    energy = (diff.real.square() + diff.imag.square()).sum(0)
    var_half = all_reduce(energy, group=group) / n_all
    scale = weight.to(sd).view(-1, 1, 1) * torch.rsqrt(var_half + eps)
    out = diff * scale + bias.to(sd).view(-1, 1, 1)
    y = torch.fft.irfft2(out, s=(h, w), norm="ortho")
    return (y.to(x.dtype), spatial_mean.detach(), _hermitian_full(var_half.detach(), w),
            int(n_all.item()))


def _same_format(y: Tensor, x: Tensor) -> Tensor:
    """channels_last in, channels_last out (the FFT returns contiguous tensors)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


# --------------------------------------------------------------------------------------------
# functional form
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------
class SpectralBatchNorm2d(nn.Module):
    """Spectral Batch Normalization over a 4-D input (N, C, H, W).

    A drop-in for ``nn.BatchNorm2d`` that normalizes the orthonormal 2-D spectrum of each feature
    map: ``Y = (X - mu) / sqrt(var + eps) * gamma + beta`` with ``X = fft2(x)``, then
    ``y = Re(ifft2(Y))``. ``stats="channel"`` pools statistics over all frequencies per channel;
    ``stats="frequency"`` keeps one pair per channel and frequency. ``impl="auto"`` uses the
    FFT-free closed form in channel mode and the FFT in frequency mode.

    Args:
        num_features: C.
        stats: ``"channel"`` or ``"frequency"``.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``
            (``momentum=None`` gives a cumulative moving average).
        impl: ``"auto"``, ``"fft"`` (reference) or ``"closed"`` (channel mode only).
        spatial_size: (H, W) of the frequency-mode statistics; if omitted they take the size of
            the first training batch.
    """

    _version = 1

    def __init__(
        self,
        num_features: int,
        stats: str = "channel",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        impl: str = "auto",
        spatial_size: Optional[tuple[int, int]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _resolve_impl(stats, impl)
        if num_features < 1:
            raise ValueError(f"num_features must be positive; got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.stats = stats
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.impl = impl
        #: Pool training statistics over the ranks of this group (set by ``sync_sbn_stats``).
        self.process_group: Optional[object] = None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            shape = self._stat_shape(spatial_size)
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _stat_shape(self, spatial_size: Optional[tuple[int, int]]) -> tuple[int, ...]:
        if self.stats == "channel":
            return (self.num_features,)
        h, w = spatial_size if spatial_size is not None else (0, 0)
        return (self.num_features, int(h), int(w))

    @property
    def spatial_size(self) -> Optional[tuple[int, int]]:
        """(H, W) of the frequency-mode running statistics; None in channel mode or before any."""
        if self.stats != "frequency" or self.running_var is None or self.running_var.numel() == 0:
            return None
        return tuple(self.running_var.shape[-2:])  # type: ignore[return-value]

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _materialize_frequency_stats(self, h: int, w: int) -> None:
        dev, dt = self.running_var.device, self.running_var.dtype
        self.running_mean = torch.zeros(self.num_features, h, w, device=dev, dtype=dt)
        self.running_var = torch.ones(self.num_features, h, w, device=dev, dtype=dt)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features)
        h, w = x.shape[-2:]
        if self.stats == "frequency" and self.track_running_stats:
            have = tuple(self.running_var.shape[-2:])
            if self.running_var.numel() == 0:
                if not self.training:
                    raise ValueError(
                        f"frequency-mode SpectralBatchNorm2d has no running statistics yet (input "
                        f"shape {tuple(x.shape)}); train or calibrate it first, or pass "
                        f"spatial_size"
                    )
                self._materialize_frequency_stats(h, w)
            elif have != (h, w):
                raise ValueError(
                    f"frequency-mode running statistics belong to spatial size {have[0]}x{have[1]}; "
                    f"got input of spatial size {h}x{w} (shape {tuple(x.shape)}). Use inputs of "
                    f"{have[0]}x{have[1]} at this layer, or re-calibrate at {h}x{w}."
                )

        use_batch = self.training or not self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return spectral_batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=use_batch,
            momentum=factor,
            eps=self.eps,
            stats=self.stats,
            impl=self.impl,
            process_group=self.process_group if self.training else None,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Frequency-mode statistics take the spatial size of the checkpoint they come from.
        if self.stats == "frequency" and self.track_running_stats:
            key = prefix + "running_var"
            if key in state_dict and state_dict[key].dim() == 3:
                h, w = state_dict[key].shape[-2:]
                if tuple(self.running_var.shape[-2:]) != (h, w):
                    self._materialize_frequency_stats(h, w)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, stats={self.stats}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        if self.impl != "auto":
            s += f", impl={self.impl}"
        if self.spatial_size is not None:
            s += f", spatial_size={self.spatial_size}"
        return s


def sync_sbn_stats(model: nn.Module, process_group: Optional[object] = None) -> int:
    """Make every SpectralBatchNorm2d in ``model`` pool its training statistics over the ranks of
    ``process_group`` (default: the whole world), like ``nn.SyncBatchNorm``. Returns the count."""
    group = "world" if process_group is None else process_group
    layers = [m for m in model.modules() if isinstance(m, SpectralBatchNorm2d)]
    for m in layers:
        m.process_group = group
    return len(layers)
