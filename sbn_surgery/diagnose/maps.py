"""How a probe point's output holds its 2-D map: NCHW, NHWC, or tokens on the patch grid, found
the way surgery finds a site's layout (``surgery.layout``), so the spectral figures of a
transformer block are taken on its patch grid, not on the token sequence."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..layers import to_maps
from ..surgery.layout import GridHints, LayoutError, grid_hints, infer_layout

__all__: list[str] = []


class MapFinder:
    """Per probe point, the layout of its output at the current input size, and its map."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hints: Optional[GridHints] = None
        self.input_hw: Optional[tuple[int, int]] = None
        #: probe point -> layout of its last output ("" when it held no 2-D map)
        self.layouts: dict[str, str] = {}

    def set_input(self, input_hw: tuple[int, int]) -> None:
        if input_hw != self.input_hw:
            self.input_hw = input_hw
            self.hints = grid_hints(self.model, input_hw)

    def view(self, path: str, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        """The (N, C, H, W) view of the map in ``x`` (prefix tokens left out), or None."""
        if self.hints is None or x.dim() not in (3, 4):
            self.layouts[path] = ""
            return None
        try:
            lay = infer_layout(tuple(x.shape), module, self.hints)
        except LayoutError:
            self.layouts[path] = ""
            return None
        self.layouts[path] = lay.layout
        return to_maps(x, lay.layout, lay.prefix, lay.hw)[0]
