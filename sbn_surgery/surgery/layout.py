"""Which layout a feature map has (NCHW, NHWC, tokens on a grid), found from the shapes of the
probe forward and checked against the grids the model can have.

The grids come from the input size and what timm tells about the model: the reductions of its
``feature_info``, its patch size (``patch_embed.patch_size``) and ``num_prefix_tokens``. A 4-D
map is NCHW or NHWC: a convolution's or norm's output is NCHW and a Linear's channels-last by
construction; otherwise the axes that hold one of the model's grids say which (NCHW when no
axis pair is a grid: the reading before layouts existed). A 3-D tensor (N, L, C) is tokens when
L is P + H*W for one of the grids, with P the model's prefix tokens, else none, else the fewest
of 1 to 8 (a class, distillation or register tokens of a model that does not say how many). A
recipe rule may state the layout (``layout:``); it is then checked the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .plan import NORMS

__all__ = ["MapLayout", "GridHints", "LayoutError", "grid_hints", "infer_layout"]

#: Reductions every model is tried at, besides those timm names.
_POWERS = (1, 2, 4, 8, 16, 32, 64)


class LayoutError(ValueError):
    """A tensor that is not a 2-D feature map in any layout (the caller adds where)."""


@dataclass(frozen=True)
class MapLayout:
    """Where the map lies in a tensor: ``layout``, channels C, the grid (H, W) and, for tokens,
    the number of prefix tokens in front of the patch tokens."""

    layout: str
    channels: int
    hw: Optional[tuple[int, int]]
    prefix: int = 0


@dataclass
class GridHints:
    """The grids (H, W) feature maps of a model can have at one input size, and its prefix
    token count. ``patch`` is the patch grid when the model has a patch embedding."""

    grids: list[tuple[int, int]] = field(default_factory=list)
    prefix: int = 0
    patch: Optional[tuple[int, int]] = None

    def describe(self) -> str:
        shown = ", ".join(f"{h}x{w}" for h, w in self.grids[:6])
        return shown + (" ..." if len(self.grids) > 6 else "")


def _pair(v) -> Optional[tuple[int, int]]:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v):
        return (int(v[0]), int(v[1]))
    return None


def grid_hints(model: nn.Module, input_hw: tuple[int, int]) -> GridHints:
    """The grids of ``model`` at input (H, W): every feature reduction timm lists, the patch
    size, and powers of two, rounded down and up."""
    h, w = input_hw
    steps: list[tuple[int, int]] = []
    patch = _pair(getattr(getattr(model, "patch_embed", None), "patch_size", None))
    if patch is not None:
        steps.append(patch)
    infos = getattr(model, "feature_info", None) or []
    infos = getattr(infos, "info", infos)
    for info in infos:
        r = _pair(info.get("reduction")) if isinstance(info, dict) else None
        if r is not None:
            steps.append(r)
    steps += [(r, r) for r in _POWERS]
    grids: list[tuple[int, int]] = []
    for rh, rw in steps:
        for fn in (math.floor, math.ceil):
            g = (max(1, fn(h / rh)), max(1, fn(w / rw)))
            if g not in grids:
                grids.append(g)
    prefix = getattr(model, "num_prefix_tokens", 0)
    prefix = prefix if isinstance(prefix, int) and not isinstance(prefix, bool) and prefix > 0 else 0
    patch_grid = (h // patch[0], w // patch[1]) if patch is not None else None
    return GridHints(grids=grids, prefix=prefix, patch=patch_grid)


def _class_axis(mod: Optional[nn.Module]) -> Optional[int]:
    """1 or -1 where the module's class fixes where its output channels are, else None."""
    if isinstance(mod, nn.Linear):
        return -1
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1
    if isinstance(mod, NORMS) and not isinstance(mod, nn.LayerNorm):
        return 1  # frozen and fused batch/group norms of timm
    return None


def _channel_axis(mod: Optional[nn.Module], shape: tuple) -> Optional[int]:
    """1 or -1 where the module fixes where the channels of its 4-D output are, else None: by
    its class, or by its channel count where only one of the two axes has it."""
    axis = _class_axis(mod)
    if axis is not None:
        return axis
    count = next((getattr(mod, a) for a in ("num_features", "out_channels", "out_features")
                  if isinstance(getattr(mod, a, None), int)), None)
    if count is not None and (shape[1] == count) != (shape[-1] == count):
        return 1 if shape[1] == count else -1
    return None


#: Prefix token counts tried after the model's own and none, for models that do not say
#: (``num_prefix_tokens``): a class token, class + distillation, register tokens.
_PREFIX_GUESSES = tuple(range(1, 9))


def _tokens(shape: tuple, hints: GridHints) -> Optional[MapLayout]:
    length = shape[1]
    grids = ([hints.patch] if hints.patch else []) + hints.grids
    for p in dict.fromkeys((hints.prefix, 0) + _PREFIX_GUESSES):
        for g in grids:
            if length - p == g[0] * g[1] and length - p >= 1:
                return MapLayout("tokens", int(shape[-1]), g, p)
    return None


def _four_d(shape: tuple, mod: Optional[nn.Module], hints: GridHints, stated: Optional[str],
            output: bool) -> MapLayout:
    nchw = MapLayout("nchw", int(shape[1]), (int(shape[2]), int(shape[3])))
    nhwc = MapLayout("nhwc", int(shape[3]), (int(shape[1]), int(shape[2])))
    if stated is not None:
        return nchw if stated == "nchw" else nhwc
    axis = _channel_axis(mod, shape) if output else _class_axis(mod)
    if axis is not None:
        return nchw if axis == 1 else nhwc
    as_nchw, as_nhwc = nchw.hw in hints.grids, nhwc.hw in hints.grids
    if as_nchw and as_nhwc:
        raise LayoutError(
            f"it can be NCHW or NHWC (both {nchw.hw[0]}x{nchw.hw[1]} and "
            f"{nhwc.hw[0]}x{nhwc.hw[1]} are grids of the model); state it with 'layout: nchw' "
            "or 'layout: nhwc' in the rule")
    return nhwc if as_nhwc else nchw


def infer_layout(shape: Optional[tuple], mod: Optional[nn.Module], hints: GridHints,
                 stated: Optional[str] = None, output: bool = True) -> MapLayout:
    """The layout of a tensor of ``shape`` that ``mod`` produced (``output``) or takes, or the
    one a rule ``stated``, checked against ``hints``; :class:`LayoutError` when it is no 2-D
    map."""
    if shape is None:
        raise LayoutError("it did not run in the probe forward")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and stated is None and _class_axis(mod) == 1:
        raise LayoutError(f"it is a 1-D sequence (N, C, L) of {type(mod).__name__}, not a "
                          "2-D map")
    if stated == "tokens" or (stated is None and len(shape) == 3):
        if len(shape) != 3:
            raise LayoutError("it is not tokens (N, P + H*W, C)")
        found = _tokens(shape, hints)
        if found is None:
            raise LayoutError(
                f"its {shape[1]} tokens are not P + H*W for a grid of the model (prefix "
                f"tokens {hints.prefix}, grids {hints.describe()})")
        return found
    if len(shape) != 4:
        raise LayoutError(
            "it is no 2-D feature map: (N, C, H, W), (N, H, W, C) or tokens (N, P + H*W, C)")
    return _four_d(shape, mod, hints, stated, output)
