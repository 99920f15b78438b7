"""What surgery records: the :class:`Site` of each inserted SBN and the :class:`Plan` of a recipe's
application, the attributes that mark an SBN as inserted (its site record, the module it replaced),
the module classes an SBN scale can fold into, and module-path helpers shared by the other parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from timm.layers import norm_act
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame
from torch import nn
from torch.nn.utils import parametrize
from torchvision.ops.misc import FrozenBatchNorm2d  # the frozen batch norm timm uses

#: Module classes whose affine eval output can absorb an SBN scale exactly (timm's BatchNormAct2d
#: and SyncBatchNormAct are subclasses of these).
FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
#: timm's fused norm + activation layers: the norm's output reaches the activation through their
#: ``drop`` child, which is where an SBN "after" the norm goes. The RMS-norm variants are newer
#: than timm's oldest supported release, so they are taken where this timm has them.
NORM_ACT = (norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct, norm_act.FrozenBatchNormAct2d,
            norm_act.GroupNormAct, norm_act.GroupNorm1Act, norm_act.LayerNormAct,
            norm_act.LayerNormAct2d) + tuple(
    getattr(norm_act, n) for n in ("RmsNormAct", "RmsNormAct2d") if hasattr(norm_act, n))
#: Normalization layers, by class: torch's batch/instance, group and layer norms, and timm's
#: frozen batch norms and fused norm + activation layers.
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d) + NORM_ACT
#: Convolutions whose output channel c is weight[c] * x + bias[c]: a per-channel scale of the
#: output is a scale of weight and bias (timm's weight-standardized StdConv2d is not one: it
#: would undo a scaled weight). The scaled weight-standardized ones take the scale in ``gain``.
PLAIN_CONVS = (nn.Conv2d, Conv2dSame)
GAIN_CONVS = (ScaledStdConv2d, ScaledStdConv2dSame)
_SITE_ATTR = "_sbn_site"


def fold_kind(mod: nn.Module, layout: str) -> Optional[str]:
    """How a per-channel scale of ``mod``'s output folds into ``mod`` exactly, for a map in
    ``layout``: ``"bn"`` (an affine BatchNorm's weight and bias), ``"linear"`` (a Linear's rows
    and bias; channels last), ``"conv"`` (a convolution's output filters and bias), ``"gain"``
    (a scaled weight-standardized convolution's gain and bias); None where it cannot."""
    if parametrize.is_parametrized(mod):
        return None
    if layout == "nchw":
        if isinstance(mod, FOLDABLE_NORMS) and getattr(mod, "affine", True):
            return "bn"
        if type(mod) in GAIN_CONVS:
            return "gain"
        if type(mod) in PLAIN_CONVS:
            return "conv"
        return None
    return "linear" if isinstance(mod, nn.Linear) else None
_REPLACED_ATTR = "_sbn_replaced"


@dataclass
class Site:
    """One inserted SBN layer."""

    module: str
    target: str
    type: str
    channels: int
    stats: str
    position: str
    stage: Optional[int]
    rule: str
    fold_into: Optional[str] = None
    spatial_size: Optional[tuple[int, int]] = None
    layout: str = "nchw"
    prefix_tokens: int = 0

    def keys(self) -> list[str]:
        names = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        return [f"{self.module}.{n}" for n in names]


@dataclass
class Plan:
    """What a recipe did (or would do) to a model."""

    model: str
    recipe: str
    sites: list[Site] = field(default_factory=list)
    params_added: int = 0

    @property
    def count(self) -> int:
        return len(self.sites)

    def new_keys(self) -> list[str]:
        return [k for s in self.sites for k in s.keys()]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "count": self.count,
            "params_added": self.params_added,
            "sites": [
                {"module": s.module, "type": s.type, "channels": s.channels, "stats": s.stats,
                 "position": s.position, "layout": s.layout}
                for s in self.sites
            ],
        }


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


# --------------------------------------------------------------------------------------------
# module paths
# --------------------------------------------------------------------------------------------
def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _ancestor(path: str, levels: int) -> str:
    """``path`` without its last ``levels`` components ("" for the root)."""
    parts = path.split(".")
    return ".".join(parts[:-levels]) if levels < len(parts) else ""


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return _get(model, head), leaf
