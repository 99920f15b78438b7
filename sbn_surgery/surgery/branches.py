"""The end of each residual branch, found without knowing the architecture (rule key
``branch_end``).

A residual block is a repeated unit: an element of an ``nn.Sequential`` or ``nn.ModuleList`` that
holds weighted layers of its own, and no such unit inside it (so a stage of blocks is not one,
its blocks are). The end of its branch is the last module to run inside it that

* carries weights of its own (a convolution, a Linear, a norm), but is no per-channel scale
  (timm's LayerScale, MetaFormer's Scale: modules whose weights are all per-channel vectors and
  that are no norm): a ResNet block's last BatchNorm, a transformer or MetaFormer block's
  ``mlp.fc2`` before layer scale, drop-path and the residual addition, an NFNet block's
  ``conv3``, a post-norm block's last norm;
* outputs as many values as the block does, as a 2-D feature map in some layout (a Swin block
  runs its MLP on tokens and returns an NHWC map of the same size; squeeze-excitation layers
  work on 1x1 maps and are passed over).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .layout import LayoutError, infer_layout
from .plan import NORMS

__all__ = ["residual_units", "branch_ends"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _weighted_children(mod: nn.Module) -> bool:
    return any(any(True for _ in c.parameters()) for c in mod.children())


def residual_units(model: nn.Module) -> list[str]:
    """The innermost repeated units of ``model`` (see the module docstring), in module order."""
    units = []
    for name, mod in model.named_modules():
        if isinstance(mod, _CONTAINERS):
            units += [f"{name}.{c}" if name else c for c, child in mod.named_children()
                      if _weighted_children(child)]
    found = set(units)
    return [u for u in units if not any(v.startswith(u + ".") for v in found)]


def _is_scale(mod: nn.Module) -> bool:
    """Weights that are all per-channel vectors, in a module that is no norm (a layer scale)."""
    if isinstance(mod, NORMS):
        return False
    own = list(mod.parameters(recurse=False))
    return all(sum(d > 1 for d in p.shape) <= 1 for p in own)


def _numel(shape: tuple) -> int:
    return math.prod(int(d) for d in shape[1:])


def branch_ends(model: nn.Module, probe: Any) -> dict[str, str]:
    """Block path -> the path of the module that ends its residual branch, for every residual
    unit that ran in ``probe`` (a surgery probe: start/end order, output shapes, grid hints)."""
    ends: dict[str, str] = {}
    for unit in residual_units(model):
        out = probe.out_shape.get(unit)
        if out is None or len(out) < 3:
            continue
        best, best_end = None, -1
        for name, mod in model.get_submodule(unit).named_modules(prefix=unit):
            if name == unit or name not in probe.end or probe.end[name] <= best_end:
                continue
            if not any(True for _ in mod.parameters(recurse=False)) or _is_scale(mod):
                continue
            shape = probe.out_shape.get(name)
            if shape is None or _numel(shape) != _numel(out):
                continue
            try:
                infer_layout(shape, mod, probe.hints)
            except LayoutError:
                continue
            best, best_end = name, probe.end[name]
        if best is not None:
            ends[unit] = best
    return ends
