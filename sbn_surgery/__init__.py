"""sbn-surgery: put Spectral Batch Normalization into a timm model, fine-tune it, export it.

Importing the package is cheap: it imports neither torch nor timm. Each public name is imported
from its module on first use (PEP 562), so ``sbn-surgery --help`` starts at once and
``from sbn_surgery import SpectralBatchNorm2d`` imports what that name needs.
"""

from __future__ import annotations

import importlib

from ._version import __version__

from ._threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch: see _threads

#: Every public name and the module it comes from. ``None``: the name is a subpackage, callable
#: as its function of the same name (``sbn_surgery.diagnose(...)`` runs diagnose(), and
#: ``import sbn_surgery.diagnose as d`` is the package; see _callable). ``convert`` is a module
#: too: it is callable as its function whichever of the two an import order binds here.
_LAZY = {
    "SbnSurgeryError": ".errors",
    "SpectralBatchNorm2d": ".layers", "spectral_batch_norm": ".layers",
    "Recipe": ".recipe", "load_recipe": ".recipe",
    "Plan": ".surgery", "Site": ".surgery", "apply_recipe": ".surgery", "calibrate": ".surgery",
    "find_sbn": ".surgery", "init_identity": ".surgery", "strip_sbn": ".surgery",
    "load_converted": ".checkpoint", "save_converted": ".checkpoint",
    "read_data_config": ".checkpoint",
    "convert": None, "diagnose": None, "study": None,
    "export_onnx": ".deploy", "finetune": ".train", "FinetuneResult": ".train",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sbn_surgery' has no attribute {name!r}")
    source = _LAZY[name]
    value = importlib.import_module(f".{name}" if source is None else source, __name__)
    if source is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
