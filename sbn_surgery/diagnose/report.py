"""What diagnose returns: one record per probe point, and the report that holds them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["LayerStats", "Report"]


@dataclass
class LayerStats:
    """Figures of one probe point. ``depth`` counts probe points from 0 at the input side;
    ``kind`` is ``block`` (a child of a stage container) or ``feature`` (a feature_info module
    taken whole, e.g. the stem); ``stage`` the feature_info module it belongs to; ``shape`` the
    output shape without the batch dimension; ``layout`` how the output holds its 2-D map
    (``nchw``, ``nhwc``, ``tokens``: the spectral figures are taken on the patch grid), "" when
    it holds none."""

    module: str
    depth: int
    rms: float
    max_abs: float
    top_freq_share: Optional[float]
    spectral_entropy: Optional[float]
    kind: str = "block"
    stage: str = ""
    shape: tuple[int, ...] = ()
    layout: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


@dataclass
class Report:
    """What ``diagnose`` measured: one ``LayerStats`` per probe point, in depth order."""

    model: str
    variant: str
    layers: list[LayerStats]
    norm_stats: str = "batch"
    samples: int = 0
    input_size: Optional[tuple[int, int, int]] = None
    sbn_layers: int = 0
    label: str = ""
    recipe: str = ""
    notes: list[str] = field(default_factory=list)

    def blocks(self) -> list[LayerStats]:
        """The residual-block records (all records if the model has no block containers)."""
        blocks = [r for r in self.layers if r.kind == "block"]
        return blocks or list(self.layers)

    def growth(self) -> Optional[float]:
        """RMS of the last block divided by RMS of the first: how much feature maps grow with
        depth. None with fewer than two blocks or a zero first RMS."""
        blocks = self.blocks()
        if len(blocks) < 2 or not blocks[0].rms > 0:
            return None
        return blocks[-1].rms / blocks[0].rms

    def to_json(self) -> dict[str, Any]:
        growth = self.growth()
        return {
            "model": self.model,
            "variant": self.variant,
            "label": self.label or self.variant,
            "norm_stats": self.norm_stats,
            "samples": self.samples,
            "input_size": list(self.input_size) if self.input_size else None,
            "sbn_layers": self.sbn_layers,
            "recipe": self.recipe or None,
            "growth": growth if growth is None or math.isfinite(growth) else None,
            "notes": list(self.notes),
            "layers": [r.to_json() for r in self.layers],
        }
