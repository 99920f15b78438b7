"""convert: timm model (+ its weights) --recipe--> converted model, calibrated."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from ._callable import make_callable
from .errors import SurgeryError
from .models import create_model, input_size_of, pretrained_cfg_of
from .recipe import Recipe, check_fits, load_recipe
from .progress import ProgressFn
from .surgery import (Plan, apply_recipe, calibrate, carry_zero_init, init_identity,
                      synthetic_batches)

__all__ = ["convert", "resolve_init", "IDENTITY_RTOL"]

#: The identity check: the converted model's eval output may differ from the original's by this
#: much, relative to the output's largest magnitude (float32 rounding is ~1e-7).
IDENTITY_RTOL = 1e-4


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
    pretrained: bool = False,
    download: bool = True,
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
    """Build ``model_name`` with timm, insert SBN where ``recipe`` says, and initialize the new
    layers. Weights come from ``checkpoint`` (a weights file, a timm training checkpoint with
    ``checkpoint_key`` picking e.g. ``state_dict_ema``, a Hugging Face/timm snapshot directory,
    or ``hf-hub:ORG/NAME``; see :mod:`sbn_surgery.weights`) or, with ``pretrained``, are timm's
    for the name's tag (``resnet50.a1_in1k``), from the Hugging Face cache; a download happens
    only with ``download`` and without HF_HUB_OFFLINE (see :mod:`sbn_surgery.hub`). Without
    either, timm's random initialization.

    ``init="identity"`` calibrates the SBN statistics on ``calibration`` batches (synthetic images
    at the model's input size when None) and sets gamma, beta so the converted model's eval output
    equals the original's. ``init="standard"`` sets gamma=1, beta=0 (without a checkpoint, gamma=0
    where the SBN ends a residual branch that timm zero-initialized, see
    :func:`~sbn_surgery.surgery.carry_zero_init`)
    and, when ``calibration`` is given, estimates the running statistics from it. The model
    carries ``sbn_meta`` for :func:`sbn_surgery.save_converted`, with the weights'
    preprocessing under ``pretrained_cfg`` (its ``input_size`` the size converted for; class
    names only when weights were loaded). A recipe whose ``models``
    patterns do not name ``model_name`` is refused unless ``force``.

    With identity init, the result is checked: its eval output on a random batch equals the
    original model's to IDENTITY_RTOL (a SurgeryError otherwise); the measured relative error is
    ``plan.identity_error``.
    """
    recipe = load_recipe(recipe)
    check_fits(recipe, model_name, force)
    model = create_model(model_name, num_classes=num_classes, model_kwargs=model_kwargs,
                         checkpoint=checkpoint, checkpoint_key=checkpoint_key,
                         pretrained=pretrained, download=download)
    loaded = checkpoint is not None or pretrained
    size = tuple(input_size) if input_size is not None else input_size_of(model)
    preprocessing = {**pretrained_cfg_of(model, labels=loaded, imagenet=pretrained),
                     "input_size": list(size)}
    mode = resolve_init(init, recipe, weights_loaded=loaded)
    probe = synthetic_batches(size, 2, 1, seed=12345)[0]  # type: ignore[arg-type]
    before = _eval_output(model, probe) if mode == "identity" else None
    plan = apply_recipe(model, recipe, input_size=size, force=True)  # type: ignore[arg-type]
    if mode == "standard" and not loaded:  # untrained: keep timm's zero-init branches
        carry_zero_init(model)
    if mode == "identity" or calibration is not None:
        batches = calibration if calibration is not None else synthetic_batches(
            size, calibrate_batch_size, calibrate_batches)  # type: ignore[arg-type]
        calibrate(model, batches, passthrough=(mode == "identity"), progress=progress,
                  total=calibrate_batches)
    if mode == "identity":
        init_identity(model)
        plan.identity_error = _identity_error(before, _eval_output(model, probe), model_name)
    model.sbn_meta = {
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "num_classes": getattr(model, "num_classes", num_classes),
        "recipe": recipe.to_yaml_text(),
        "recipe_name": recipe.name,
        "input_size": list(size),
        "init": mode,
        # what the weights expect of their images (at the size converted for): see
        # sbn_surgery.pretrained_cfg; finetune replaces it with what it trained with
        "pretrained_cfg": preprocessing,
    }
    return model, plan


def _eval_output(model: nn.Module, x: torch.Tensor):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


def _identity_error(before, after, name: str) -> Optional[float]:
    """max |after - before| / max |before|; a SurgeryError above IDENTITY_RTOL."""
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return None  # a model whose output is not one tensor: nothing to compare simply
    scale = float(before.abs().max())
    err = float((after - before).abs().max()) / max(scale, 1e-12)
    if not err <= IDENTITY_RTOL:  # nan included
        raise SurgeryError(f"identity check failed for {name}: the converted model's eval output "
                           f"differs from the original's by {err:.2e} (relative; at most "
                           f"{IDENTITY_RTOL:g} expected); no file was written. Please report it, "
                           "with the model name and recipe")
    return err


make_callable(__name__)  # sbn_surgery.convert(...) calls convert(), in any import order
