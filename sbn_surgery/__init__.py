"""sbn-surgery: put Spectral Batch Normalization into a timm model, fine-tune it, export it."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SbnSurgeryError
from .layers import SpectralBatchNorm2d, spectral_batch_norm

__all__ = ["__version__", "SbnSurgeryError", "SpectralBatchNorm2d", "spectral_batch_norm"]
