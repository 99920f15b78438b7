"""sbn-surgery: put Spectral Batch Normalization into a timm model, fine-tune it, export it."""

from __future__ import annotations

from ._version import __version__

from ._threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch: see _threads

from .errors import SbnSurgeryError
from .layers import SpectralBatchNorm2d, spectral_batch_norm
from .recipe import Recipe, load_recipe
from .surgery import Plan, Site, apply_recipe, calibrate, find_sbn, init_identity, strip_sbn
from .checkpoint import load_converted, read_data_config, save_converted
from .convert import convert
# The subpackage, callable as its function: sbn_surgery.diagnose(...) runs diagnose() and
# ``import sbn_surgery.diagnose as d`` is the package (see _callable); study is the same.
from . import diagnose

#: Heavier entry points (onnx, the training loop), imported on first use; None: the subpackage.
_LAZY = {"export_onnx": ".deploy", "finetune": ".train", "FinetuneResult": ".train",
         "study": None}

__all__ = [
    "__version__", "SbnSurgeryError", "SpectralBatchNorm2d", "spectral_batch_norm", "Recipe",
    "load_recipe", "Plan", "Site", "apply_recipe", "calibrate", "find_sbn", "init_identity",
    "strip_sbn", "save_converted", "load_converted", "read_data_config", "convert", "diagnose",
    "export_onnx", "finetune", "FinetuneResult", "study",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        source = _LAZY[name]
        value = importlib.import_module(f".{name}" if source is None else source, __name__)
        if source is not None:
            value = getattr(value, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sbn_surgery' has no attribute {name!r}")
