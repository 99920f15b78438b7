"""Where the 2-D feature map lies in a tensor, and the views between it and NCHW.

SBN is defined on an (N, C, H, W) map. Models lay the same map out in three ways:

* ``nchw``: (N, C, H, W), as convolutions produce it;
* ``nhwc``: (N, H, W, C), channels last, as Swin, MambaOut or ConvNeXt's MLP hold it;
* ``tokens``: (N, P + H*W, C), P prefix tokens (class, distillation, register) followed by the
  patch tokens of an H x W grid in row-major order, as ViT-like models hold it.

:func:`to_maps` returns an NCHW *view* of the map (no copy: an NHWC tensor permuted to NCHW is a
channels_last NCHW tensor, and the patch tokens are the same (N, H, W, C) view) and the prefix
tokens apart; :func:`from_maps` lays the normalized map out as the input was. Only ``tokens``
with prefix tokens copies once, to join the prefix back on.

Channel-mode statistics need only the number of pixels H*W and the pixel (0, 0), the first patch
token (docs/sbn.md), so on tokens channel mode runs without the grid: tokens whose count does not
fill the grid (a model built with ``dynamic_img_size`` at another input size) lie on a 1 x L line,
which gives the same result. Frequency mode needs the grid; its statistics belong to it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "check_layout", "to_maps", "from_maps", "channel_shape", "map_size"]

LAYOUTS = ("nchw", "nhwc", "tokens")


def check_layout(layout: str, prefix_tokens: int, grid: Optional[tuple[int, int]],
                 stats: str) -> Optional[tuple[int, int]]:
    """Refuse a layout the layer cannot run (ValueError); returns ``grid`` as a tuple of ints."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(f"prefix_tokens must be an int >= 0; got {prefix_tokens!r}")
    if prefix_tokens and layout != "tokens":
        raise ValueError(f"prefix_tokens={prefix_tokens} needs layout='tokens'; a {layout} map "
                         "has no prefix tokens")
    if grid is not None:
        if len(grid) != 2 or min(int(g) for g in grid) < 1:
            raise ValueError(f"grid must be (H, W) with H, W >= 1; got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    if layout == "tokens" and stats == "frequency" and grid is None:
        raise ValueError("frequency-mode SBN on tokens needs the grid (H, W) the patch tokens lie "
                         "on (grid=...): its statistics are per frequency of that grid")
    return grid


def _shape_error(x: Tensor, layout: str, want: str, num_features: Optional[int]) -> ValueError:
    c = f" with C = {num_features}" if num_features is not None else ""
    return ValueError(f"SpectralBatchNorm2d (layout={layout}) expects {want}{c}; got shape "
                      f"{tuple(x.shape)}")


def to_maps(x: Tensor, layout: str, prefix_tokens: int = 0, grid: Optional[tuple[int, int]] = None,
            num_features: Optional[int] = None, need_grid: bool = False
            ) -> tuple[Tensor, Optional[Tensor]]:
    """(NCHW view of the map in ``x``, the prefix tokens or None). ``need_grid``: the tokens must
    fill ``grid`` (frequency mode); otherwise tokens that do not lie on a 1 x L line."""
    if layout == "nchw":
        return x, None
    if layout == "nhwc":
        if x.dim() != 4 or (num_features is not None and x.shape[-1] != num_features):
            raise _shape_error(x, layout, "a 4-D input (N, H, W, C)", num_features)
        return x.permute(0, 3, 1, 2), None
    if layout != "tokens":
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if x.dim() != 3 or (num_features is not None and x.shape[-1] != num_features):
        raise _shape_error(x, layout, f"a 3-D input (N, {prefix_tokens} + H*W, C)", num_features)
    p = prefix_tokens
    length = x.shape[1] - p
    if length < 1:
        raise ValueError(f"SpectralBatchNorm2d (layout=tokens) expects {p} prefix token(s) and at "
                         f"least one patch token; got shape {tuple(x.shape)}")
    if grid is not None and grid[0] * grid[1] == length:
        h, w = grid
    elif need_grid:
        got = "no grid" if grid is None else f"the {grid[0]}x{grid[1]} grid"
        raise ValueError(
            f"frequency-mode SBN on tokens: {length} patch tokens (shape {tuple(x.shape)}, "
            f"{p} prefix) do not fill {got} its statistics belong to. Use inputs of the size "
            "the model was converted at, or re-convert at this size.")
    else:
        h, w = 1, length
    patches = x[:, p:] if p else x
    return patches.unflatten(1, (h, w)).permute(0, 3, 1, 2), (x[:, :p] if p else None)


def from_maps(y: Tensor, layout: str, prefix: Optional[Tensor] = None) -> Tensor:
    """Lay the NCHW map ``y`` out as :func:`to_maps` found it; ``prefix`` (the prefix tokens'
    output) goes in front of the patch tokens."""
    if layout == "nchw":
        return y
    out = y.permute(0, 2, 3, 1)
    if layout == "nhwc":
        return out
    out = out.flatten(1, 2)
    if prefix is None:
        return out
    return torch.cat([prefix.to(out.dtype), out], dim=1)


def channel_shape(layout: str, channels: int) -> tuple[int, ...]:
    """The shape a per-channel vector takes to broadcast over a tensor in ``layout``."""
    if layout == "nchw":
        return (1, channels, 1, 1)
    return (1, 1, 1, channels) if layout == "nhwc" else (1, 1, channels)


def map_size(shape: tuple, layout: str, prefix_tokens: int = 0,
             grid: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """(H, W) of the map :func:`to_maps` finds in a tensor of ``shape``."""
    if layout == "nchw":
        return int(shape[-2]), int(shape[-1])
    if layout == "nhwc":
        return int(shape[1]), int(shape[2])
    length = int(shape[1]) - prefix_tokens
    if grid is not None and grid[0] * grid[1] == length:
        return grid
    return 1, length
