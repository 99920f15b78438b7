"""Spectral Batch Normalization (see docs/sbn.md for the definition implemented here).

Two statistics modes:

* ``channel``: one complex mean and one real variance per channel, pooled over the batch and all
  H*W frequencies of the orthonormal 2-D DFT.
* ``frequency``: one mean and one variance per channel and frequency, over the batch alone.

Three paths:

* ``fft``: the reference, written with ``torch.fft`` exactly as the definition reads.
* ``closed`` (channel mode only): the closed form. With S = sqrt(H*W) and x00 the pixel (0, 0),
  mu = E_n[x00] / S, var = E[x^2] - mu^2 (Parseval), and
  y = s * x + S * (beta - s * mu) at pixel (0, 0) only, with s = gamma / sqrt(var + eps).
  No FFT, one reduction and one elementwise pass, with a hand-written backward.
* ``matmul`` (frequency mode only): the real DFT as dense matrix products with cos/sin matrices
  (one (HW, 2HW') product for small maps, two separable ones above), no complex tensors, with a
  hand-written backward. ``impl="auto"`` takes it where it beats the FFT (see
  ``checks.AUTO_MATMUL_MAX_SIDE`` for the measured crossover); synced statistics
  (``sync_sbn_stats``) always take the FFT.

Layouts (``layout=``, ``layout.py``): the map may be NCHW, NHWC (N, H, W, C), or tokens
(N, P + H*W, C) with P prefix tokens in front of the patch grid. Every layout is a view of the
NCHW map; channel mode runs the closed form on channels-last tensors as they lie
(``lastdim.py``). Prefix tokens are left out of the statistics and take the per-channel gain.

Buffers follow ``nn.BatchNorm2d``: ``running_mean``, ``running_var``, ``num_batches_tracked``.
In channel mode both statistics have shape (C,). In frequency mode ``running_mean`` is the
batch mean in the *spatial* domain, shape (C, H, W): its DFT is the complex per-frequency mean,
so it is stored exactly as a real tensor, and an exponential average in one domain is the same
in the other. ``running_var`` has shape (C, H, W), one real variance per frequency of the full
spectrum. Before the first training step they have shape (C, 0, 0) unless ``spatial_size`` was
given. ``num_batches_skipped`` counts training batches whose statistics were not finite: they
leave the running statistics and ``num_batches_tracked`` untouched. It is not saved in the
state_dict, which keeps ``nn.BatchNorm2d``'s keys.
"""

from .checks import IMPLS, STATS_MODES
from .functional import spectral_batch_norm
from .layout import LAYOUTS, channel_shape, from_maps, map_size, to_maps
from .module import SpectralBatchNorm2d, sync_sbn_stats
from .spectral import frequency_scale

__all__ = ["SpectralBatchNorm2d", "spectral_batch_norm", "sync_sbn_stats", "frequency_scale",
           "STATS_MODES", "IMPLS", "LAYOUTS", "to_maps", "from_maps", "channel_shape", "map_size"]
