"""sbn-surgery: put Spectral Batch Normalization into a timm model, fine-tune it, export it."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SbnSurgeryError
from .layers import SpectralBatchNorm2d, spectral_batch_norm
from .recipe import Recipe, load_recipe
from .surgery import Plan, Site, apply_recipe, calibrate, find_sbn, init_identity, strip_sbn
from .checkpoint import load_converted, save_converted
from .convert import convert

__all__ = [
    "__version__", "SbnSurgeryError", "SpectralBatchNorm2d", "spectral_batch_norm", "Recipe",
    "load_recipe", "Plan", "Site", "apply_recipe", "calibrate", "find_sbn", "init_identity",
    "strip_sbn", "save_converted", "load_converted", "convert",
]
