"""The settings diagnose compares: with or without SBN, with or without BatchNorm."""

from __future__ import annotations

import copy
import os
from typing import Any, Optional, Sequence, Union

from timm.layers.norm_act import FrozenBatchNormAct2d
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import CheckpointError, SbnSurgeryError, SurgeryError
from ..layers import SpectralBatchNorm2d

__all__ = ["VARIANTS", "remove_batchnorm", "make_variant", "load_model", "sbn_count"]

#: The four settings of ``compare``, in plot order: (name, label, with SBN, without BN).
VARIANTS = (
    ("bn", "BN", False, False),
    ("bn+sbn", "BN + SBN", True, False),
    ("no-bn", "no BN", False, True),
    ("no-bn+sbn", "no BN + SBN", True, True),
)


def _is_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, SpectralBatchNorm2d):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    # frozen batch norms (torchvision's, which timm uses, and timm's FrozenBatchNormAct2d) are
    # not _BatchNorm subclasses but normalize the same way.
    return isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d))


def _no_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    # Fused norm+act modules (timm BatchNormAct2d) keep their drop and act children, which is
    # where an SBN inserted "after" the norm lives (as drop.sbn, through drop's hook).
    drop = getattr(self, "drop", None)
    act = getattr(self, "act", None)
    if isinstance(drop, nn.Module):
        x = drop(x)
    if isinstance(act, nn.Module):
        x = act(x)
    return x


_NO_NORM_CLASSES: dict[type, type] = {}


def _no_norm_class(cls: type) -> type:
    if cls not in _NO_NORM_CLASSES:
        _NO_NORM_CLASSES[cls] = type(f"NoNorm{cls.__name__}", (cls,),
                                     {"forward": _no_norm_forward, "_sbn_no_norm": True,
                                      "__module__": __name__})
    return _NO_NORM_CLASSES[cls]


def remove_batchnorm(model: nn.Module) -> int:
    """Turn every BatchNorm of ``model`` into the identity, in place; returns how many.

    The modules stay where they are with their children, parameters and hooks: only their
    class is swapped for a subclass whose forward skips the normalization (and, for a fused
    BatchNormAct2d, still applies its drop and activation). So an SBN inserted as a child of a
    BatchNorm and applied by a hook on it keeps running. SBN layers are not touched.
    """
    count = 0
    for module in model.modules():
        if _is_batchnorm(module) and not getattr(module, "_sbn_no_norm", False):
            module.__class__ = _no_norm_class(type(module))
            count += 1
    return count


def sbn_count(model: nn.Module) -> int:
    """How many SpectralBatchNorm2d layers ``model`` holds (0: not converted)."""
    return sum(isinstance(m, SpectralBatchNorm2d) for m in model.modules())


def make_variant(model: nn.Module, *, recipe: Any = None, sbn: bool = False,
                 remove_bn: bool = False, input_size: Optional[Sequence[int]] = None,
                 force: bool = False) -> nn.Module:
    """A copy of ``model`` in one diagnose setting; ``model`` itself is not changed.

    ``sbn=True`` keeps the SBN layers of an already converted model, or applies ``recipe``
    (a Recipe, a shipped name or a path) to a model without them; ``sbn=False`` strips any SBN.
    ``remove_bn=True`` then neutralizes every BatchNorm (:func:`remove_batchnorm`), after the
    recipe, so SBN layers hosted by BatchNorms survive. ``force`` applies a recipe whose
    ``models`` patterns do not name the model.
    """
    _check_recipe(model, recipe)
    out = copy.deepcopy(model)
    has_sbn = sbn_count(out) > 0
    if sbn and not has_sbn:
        if recipe is None:
            raise SbnSurgeryError(
                "the SBN variant needs a recipe: the model has no SpectralBatchNorm2d layers. "
                "Give one with --recipe (e.g. --recipe resnet) or pass a converted model."
            )
        from ..surgery import apply_recipe

        kwargs = {"input_size": tuple(input_size)} if input_size is not None else {}
        apply_recipe(out, recipe, force=force, **kwargs)
    elif not sbn and has_sbn:
        from ..surgery import strip_sbn

        out = strip_sbn(out)
    if remove_bn:
        remove_batchnorm(out)
    return out


def load_model(model: str, *, checkpoint: Optional[Union[str, os.PathLike]] = None,
               num_classes: Optional[int] = None,
               model_kwargs: Optional[dict[str, Any]] = None,
               checkpoint_key: Optional[str] = None, pretrained: bool = False) -> nn.Module:
    """The model to diagnose: a converted checkpoint (``model`` is a .safetensors path, or
    ``checkpoint`` is one written by convert/finetune) with its SBN layers, else the timm model
    ``model`` with ``checkpoint``'s weights (a file, folder or ``hf-hub:ORG/NAME``), timm's
    pretrained weights for its tag (``pretrained``, through the Hugging Face cache), or at
    initialization without either."""
    from ..checkpoint import is_converted, load_converted, read_checkpoint_metadata
    from ..models import create_model

    if os.path.isfile(model) or str(model).endswith(".safetensors"):
        if pretrained or checkpoint is not None:
            raise CheckpointError(f"{model} is a converted checkpoint with its own weights; "
                                  "leave out --pretrained and --checkpoint")
        return load_converted(model)
    if checkpoint is not None and is_converted(checkpoint):  # else plain weights
        meta = read_checkpoint_metadata(checkpoint)
        if meta is not None:
            name = str(meta.get("model_name", ""))
            if name and name != model:
                raise CheckpointError(
                    f"{checkpoint} is a converted {name}, not {model}; run "
                    f"`sbn-surgery diagnose {checkpoint}` or give the matching model name"
                )
            return load_converted(checkpoint)
    return create_model(model, num_classes=num_classes, model_kwargs=model_kwargs,
                        checkpoint=checkpoint, checkpoint_key=checkpoint_key,
                        pretrained=pretrained)


def _check_recipe(model: nn.Module, recipe: Any) -> None:
    if recipe is not None and sbn_count(model) > 0:
        raise SurgeryError(
            f"the model already has {sbn_count(model)} SBN layer(s) (a converted checkpoint); "
            "its own SBN layers are diagnosed, so leave out the recipe (--recipe)"
        )
