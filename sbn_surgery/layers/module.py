"""``SpectralBatchNorm2d``, the ``nn.BatchNorm2d``-compatible module, and ``sync_sbn_stats``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .checks import _check_input, _resolve_impl
from .functional import spectral_batch_norm

__all__ = ["SpectralBatchNorm2d", "sync_sbn_stats"]


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
