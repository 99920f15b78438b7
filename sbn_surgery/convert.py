"""convert: timm model (+ the user's checkpoint) --recipe--> converted model, calibrated."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from ._callable import make_callable
from .models import create_model, input_size_of
from .recipe import Recipe, check_fits, load_recipe
from .progress import ProgressFn
from .surgery import (Plan, apply_recipe, calibrate, carry_zero_init, init_identity,
                      synthetic_batches)

__all__ = ["convert", "resolve_init"]


def resolve_init(init: Optional[str], recipe: Recipe, weights_loaded: bool) -> str:
    """``identity`` or ``standard``. ``auto`` (the default) is identity when weights were loaded:
    inserting SBN must not change a trained model's function."""
    choice = init or recipe.sbn.init or "auto"
    if choice == "auto":
        return "identity" if weights_loaded else "standard"
    return choice


def convert(
    model_name: str,
    recipe: Union[Recipe, str, Path],
    *,
    checkpoint: Optional[Union[str, Path]] = None,
    checkpoint_key: Optional[str] = None,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    init: Optional[str] = None,
    calibration: Optional[Iterable[torch.Tensor]] = None,
    calibrate_batches: int = 4,
    calibrate_batch_size: int = 8,
    input_size: Optional[tuple[int, int, int]] = None,
    progress: Optional[ProgressFn] = None,
    force: bool = False,
) -> tuple[nn.Module, Plan]:
    """Build ``model_name`` with timm (``pretrained=False``; weights only from ``checkpoint``),
    insert SBN where ``recipe`` says, and initialize the new layers. ``checkpoint`` is a weights
    file, a timm training checkpoint (``checkpoint_key`` picks e.g. ``state_dict_ema``) or a
    Hugging Face/timm snapshot directory (see :mod:`sbn_surgery.weights`).

    ``init="identity"`` calibrates the SBN statistics on ``calibration`` batches (synthetic images
    at the model's input size when None) and sets gamma, beta so the converted model's eval output
    equals the original's. ``init="standard"`` sets gamma=1, beta=0 (without a checkpoint, gamma=0
    where the SBN ends a residual branch that timm zero-initialized, see
    :func:`~sbn_surgery.surgery.carry_zero_init`)
    and, when ``calibration`` is given, estimates the running statistics from it. The model
    carries ``sbn_meta`` for :func:`sbn_surgery.save_converted`. A recipe whose ``models``
    patterns do not name ``model_name`` is refused unless ``force``.
    """
    recipe = load_recipe(recipe)
    check_fits(recipe, model_name, force)
    model = create_model(model_name, num_classes=num_classes, model_kwargs=model_kwargs,
                         checkpoint=checkpoint, checkpoint_key=checkpoint_key)
    size = tuple(input_size) if input_size is not None else input_size_of(model)
    plan = apply_recipe(model, recipe, input_size=size, force=True)  # type: ignore[arg-type]
    mode = resolve_init(init, recipe, weights_loaded=checkpoint is not None)
    if mode == "standard" and checkpoint is None:  # untrained: keep timm's zero-init branches
        carry_zero_init(model)
    if mode == "identity" or calibration is not None:
        batches = calibration if calibration is not None else synthetic_batches(
            size, calibrate_batch_size, calibrate_batches)  # type: ignore[arg-type]
        calibrate(model, batches, passthrough=(mode == "identity"), progress=progress,
                  total=calibrate_batches)
    if mode == "identity":
        init_identity(model)
    model.sbn_meta = {
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "num_classes": getattr(model, "num_classes", num_classes),
        "recipe": recipe.to_yaml_text(),
        "recipe_name": recipe.name,
        "input_size": list(size),
        "init": mode,
    }
    return model, plan


make_callable(__name__)  # sbn_surgery.convert(...) calls convert(), in any import order
