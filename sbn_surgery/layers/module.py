"""``SpectralBatchNorm2d``, the ``nn.BatchNorm2d``-compatible module, and ``sync_sbn_stats``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .checks import _check_input, _check_momentum, _check_train_count, _resolve_impl
from .functional import _sbn_forward, _sbn_forward_last
from .synced import _sync_over
from .layout import check_layout, from_maps, to_maps

__all__ = ["SpectralBatchNorm2d", "sync_sbn_stats"]


class SpectralBatchNorm2d(nn.Module):
    """Spectral Batch Normalization over a 2-D feature map: (N, C, H, W), or laid out as
    (N, H, W, C) or as tokens (N, P + H*W, C) (``layout``).

    A drop-in for ``nn.BatchNorm2d`` that normalizes the orthonormal 2-D spectrum of each feature
    map: ``Y = (X - mu) / sqrt(var + eps) * gamma + beta`` with ``X = fft2(x)``, then
    ``y = Re(ifft2(Y))``. ``stats="channel"`` pools statistics over all frequencies per channel;
    ``stats="frequency"`` keeps one pair per channel and frequency. ``impl="auto"`` uses the
    FFT-free closed form in channel mode, and in frequency mode the DFT as real matrix products
    for maps up to 32x32 (the FFT above).

    Args:
        num_features: C.
        stats: ``"channel"`` or ``"frequency"``.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``
            (``momentum=None`` gives a cumulative moving average).
        impl: ``"auto"``, ``"fft"`` (reference), ``"closed"`` (channel mode only) or
            ``"matmul"`` (frequency mode only: the DFT as dense matrix products, which
            ``"auto"`` picks for small maps).
        spatial_size: (H, W) of the frequency-mode statistics; if omitted they take the size of
            the first training batch.
        layout: where the map lies in the input (``layers.layout``): ``"nchw"`` (default),
            ``"nhwc"``, or ``"tokens"``: (N, P + H*W, C), ``prefix_tokens`` P (class,
            distillation, register tokens) in front of the patch tokens of the H x W ``grid``
            in row-major order. Channel mode needs no grid (tokens that do not fill it lie on a
            1 x L line, with the same result); frequency mode needs it.
        prefix_tokens, grid: see ``layout``.

    Prefix tokens are not counted in the statistics and get no shift, but are multiplied by the
    same per-channel gain ``s = gamma / sqrt(var + eps)`` as the patch tokens (in frequency mode
    var is the mean over frequencies of the per-frequency variance: the gain of a flat
    spectrum). They live in the same channel space and join the same residual stream as the
    patch tokens, so the whole sequence keeps one scale per channel, and an eval-mode layer is
    ``s * x`` on every token plus a constant on the first patch token: ``s`` folds exactly into
    the Linear or convolution in front. The layout is kept as plain attributes: the state_dict
    has ``nn.BatchNorm2d``'s keys whatever the layout.

    A training batch whose statistics are not finite (an inf or NaN in the input) leaves the
    running statistics and ``num_batches_tracked`` as they were and adds one to the buffer
    ``num_batches_skipped``; its output is what the non-finite statistics give.
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
        layout: str = "nchw",
        prefix_tokens: int = 0,
        grid: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        _resolve_impl(stats, impl)
        grid = check_layout(layout, prefix_tokens, grid, stats)
        _check_momentum(momentum)
        if num_features < 1:
            raise ValueError(f"num_features must be positive; got {num_features}")
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
        if spatial_size is not None and (len(spatial_size) != 2 or min(spatial_size) < 1):
            raise ValueError(f"spatial_size must be (H, W) with H, W >= 1; got {spatial_size!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.stats = stats
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.impl = impl
        self.layout = layout
        self.prefix_tokens = int(prefix_tokens)
        self.grid = grid
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
            #: Training batches whose statistics were not finite and left the running ones alone.
            #: Not saved: the state_dict keeps BatchNorm2d's keys, so an SBN that replaced a
            #: BatchNorm still loads into the plain model, and older checkpoints load strictly.
            self.register_buffer(
                "num_batches_skipped",
                torch.tensor(0, dtype=torch.long, device=device),
                persistent=False,
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
            self.register_buffer("num_batches_skipped", None)

    def __setstate__(self, state: dict) -> None:
        # layers pickled before layouts existed were NCHW
        state.setdefault("layout", "nchw")
        state.setdefault("prefix_tokens", 0)
        state.setdefault("grid", None)
        super().__setstate__(state)

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

    def channel_constants(self) -> tuple[Tensor, Tensor]:
        """(s, k), each (C,) float64 on the CPU: in eval mode a channel-mode layer is
        ``Y = X * s + k`` at every frequency of the spectrum X, with ``s = gamma / sqrt(var + eps)``
        and ``k = beta - s * mean`` from the running statistics."""
        if self.stats != "channel" or self.running_var is None:
            raise ValueError("channel_constants needs a channel-mode layer with running statistics")
        c = self.num_features
        w = self.weight.detach().double().cpu() if self.weight is not None \
            else torch.ones(c, dtype=torch.float64)
        b = self.bias.detach().double().cpu() if self.bias is not None \
            else torch.zeros(c, dtype=torch.float64)
        s = w / torch.sqrt(self.running_var.detach().double().cpu() + self.eps)
        return s, b - s * self.running_mean.detach().double().cpu()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
            self.num_batches_skipped.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _fresh_frequency_stats(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        dev, dt = self.running_var.device, self.running_var.dtype
        return (torch.zeros(self.num_features, h, w, device=dev, dtype=dt),
                torch.ones(self.num_features, h, w, device=dev, dtype=dt))

    def _running_for(self, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], bool]:
        """The running statistics this input uses: (mean, var, fresh). Frequency-mode statistics
        not yet sized come fresh at the input's size and are kept only if the call succeeds."""
        if not (self.stats == "frequency" and self.track_running_stats):
            return self.running_mean, self.running_var, False
        h, w = x.shape[-2:]
        have = tuple(self.running_var.shape[-2:])
        if self.running_var.numel() == 0:
            if not self.training:
                raise ValueError(
                    f"frequency-mode SpectralBatchNorm2d has no running statistics yet (input "
                    f"shape {tuple(x.shape)}); train or calibrate it first, or pass spatial_size"
                )
            return (*self._fresh_frequency_stats(h, w), True)
        if have != (h, w):
            raise ValueError(
                f"frequency-mode running statistics belong to spatial size {have[0]}x{have[1]}; "
                f"got input of spatial size {h}x{w} (shape {tuple(x.shape)}). Use inputs of "
                f"{have[0]}x{have[1]} at this layer, or re-calibrate at {h}x{w}."
            )
        return self.running_mean, self.running_var, False

    def forward(self, x: Tensor) -> Tensor:
        # Every check runs before the module changes: a call that raises leaves it as it was.
        maps, prefix = x, None
        if self.layout != "nchw":
            maps, prefix = to_maps(x, self.layout, self.prefix_tokens, self.grid,
                                   self.num_features, need_grid=self.stats == "frequency")
        _check_input(maps, self.num_features)
        _check_momentum(self.momentum)
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            _check_train_count(maps, self.stats)
        mean, var, fresh = self._running_for(maps)
        update = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if update and self.momentum is None:
            # Cumulative average over the batches taken so far, this one included; a tensor, so
            # no host sync (num_batches_tracked counts only batches that updated the statistics).
            factor = 1.0 / (self.num_batches_tracked + 1).to(torch.float64)
        group = self.process_group if self.training else None
        if self._channels_last_closed(maps, use_batch, group):
            # tokens and NHWC maps in closed form, on the tensor as it lies (lastdim.py)
            p = self.prefix_tokens if self.layout == "tokens" else 0
            y, took = _sbn_forward_last(x.flatten(1, -2), p, mean, var, self.weight, self.bias,
                                        use_batch, factor, self.eps)
            y = y.reshape(x.shape)
        else:
            y, took, gain = _sbn_forward(maps, mean, var, self.weight, self.bias, use_batch,
                                         factor, self.eps, self.stats, self.impl, group,
                                         want_gain=prefix is not None)
            if self.layout != "nchw":
                if prefix is not None:
                    prefix = (prefix.to(gain.dtype) * gain).to(y.dtype)
                y = from_maps(y, self.layout, prefix)
        if fresh:
            self.running_mean, self.running_var = mean, var
        if update and took is not None:
            self.num_batches_tracked.add_(took.long())
            self.num_batches_skipped.add_((~took).long())
        return y

    def _channels_last_closed(self, maps: Tensor, use_batch: bool, group) -> bool:
        """Whether a tokens or NHWC map takes the closed form on the tensor as it lies: channel
        mode, the closed path, more than one pixel, and no statistics pooled across ranks."""
        return (self.layout != "nchw" and self.stats == "channel"
                and self.impl in ("auto", "closed") and maps.shape[-1] * maps.shape[-2] > 1
                and not (use_batch and _sync_over(group)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.track_running_stats:
            _check_loaded_stats(self, state_dict, prefix)
        # Frequency-mode statistics take the spatial size of the checkpoint they come from.
        if self.stats == "frequency" and self.track_running_stats:
            key = prefix + "running_var"
            if key in state_dict and state_dict[key].dim() == 3:
                h, w = state_dict[key].shape[-2:]
                if tuple(self.running_var.shape[-2:]) != (h, w):
                    self.running_mean, self.running_var = self._fresh_frequency_stats(h, w)
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
        if self.layout != "nchw":
            s += f", layout={self.layout}"
        if self.prefix_tokens:
            s += f", prefix_tokens={self.prefix_tokens}"
        if self.grid is not None:
            s += f", grid={self.grid}"
        return s


def sync_sbn_stats(model: nn.Module, process_group: Optional[object] = None) -> int:
    """Make every SpectralBatchNorm2d in ``model`` pool its training statistics over the ranks of
    ``process_group`` (default: the whole world), like ``nn.SyncBatchNorm``. Returns the count."""
    group = "world" if process_group is None else process_group
    layers = [m for m in model.modules() if isinstance(m, SpectralBatchNorm2d)]
    for m in layers:
        m.process_group = group
    return len(layers)


def _check_loaded_stats(layer: SpectralBatchNorm2d, state_dict, prefix: str) -> None:
    """Refuse running statistics of the wrong shape, or not finite, before anything is loaded."""
    mean, var = state_dict.get(prefix + "running_mean"), state_dict.get(prefix + "running_var")
    c = layer.num_features
    for name, t in (("running_mean", mean), ("running_var", var)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.dtype == torch.long):
            raise ValueError(f"{prefix}{name}: expected a real tensor; got {type(t).__name__} "
                             f"{getattr(t, 'dtype', '')}")
        ok = (t.shape == (c,)) if layer.stats == "channel" else (t.dim() == 3 and t.shape[0] == c)
        if not ok:
            want = f"({c},)" if layer.stats == "channel" else f"({c}, H, W)"
            raise ValueError(f"{prefix}{name} has shape {tuple(t.shape)}; this {layer.stats}-mode "
                             f"SpectralBatchNorm2d({c}) needs {want}. Load a checkpoint of the "
                             f"same model and SBN mode.")
        if not torch.isfinite(t).all():
            raise ValueError(f"{prefix}{name} holds non-finite values (inf or NaN); the running "
                             f"statistics would turn every output into NaN. Re-calibrate them.")
    if mean is not None and var is not None and mean.shape != var.shape:
        raise ValueError(f"{prefix}running_mean has shape {tuple(mean.shape)} but running_var "
                         f"{tuple(var.shape)}; they must match")
    if var is not None and bool((var < 0).any()):
        raise ValueError(f"{prefix}running_var holds negative values; a variance is >= 0")
