"""Feature-map norms and spectra per depth: the paper's two observations, measured in a model.

``diagnose(model, batches)`` runs the batches through a copy of the model and records, at every
residual block (or stage output), in depth order:

* ``rms``: sqrt(mean(x^2)) over the whole output (batch, channels, pixels);
* ``max_abs``: max |x|;
* ``top_freq_share``: the share of a feature map's spectral energy held by its largest frequency
  component, one value per (sample, channel) map of the full orthonormal 2-D DFT, averaged over
  maps (so every channel counts equally, however large its norm);
* ``spectral_entropy``: the Shannon entropy of that map's normalized power spectrum divided by
  log(H*W): 1 for a flat spectrum, 0 for all energy in one component; averaged over maps.

Maps with zero energy are left out of the two spectral averages; the spectral figures are None
where the output is not a 4-D feature map or has a single pixel.

Probe points are found from timm's ``feature_info``: the children of each stage container it
names (the residual blocks), or the named module itself where it holds no blocks (a stem). See
:func:`probe_points`.

Norm layers run on **batch statistics** by default: the paper's observation (activations explode
with depth at initialization) is about the forward pass that training sees, and a BatchNorm at
initialization in eval mode (running mean 0, variance 1) is almost the identity, which would hide
exactly what BN does. Every other module stays in eval mode (no dropout, no drop-path), and all of
this happens on a deep copy, so the caller's model, its mode and its running statistics are
untouched. ``norm_stats="running"`` evaluates the copy in eval mode instead (trained models).

``remove_batchnorm`` neutralizes every BatchNorm in place (the paper's "without BN" setting)
while inserted SBN layers, which live as children of BatchNorm hosts, keep running.
"""

from .._callable import make_callable
from .figures import feature_stats, spectral_stats
from .measure import compare, diagnose, diagnose_variant
from .plot import plot_rms, rms_figure
from .probes import probe_points
from .report import LayerStats, Report
from .variants import (VARIANTS, load_model, make_variant, remove_batchnorm, restore_batchnorm,
                       sbn_count)

__all__ = [
    "diagnose", "diagnose_variant", "compare", "Report", "LayerStats", "VARIANTS", "make_variant",
    "remove_batchnorm", "restore_batchnorm", "load_model", "sbn_count", "probe_points",
    "feature_stats", "spectral_stats", "plot_rms", "rms_figure",
]

make_callable(__name__)  # sbn_surgery.diagnose(...) calls diagnose(); the name stays the package
