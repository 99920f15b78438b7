"""The measurement: forward hooks at the probe points of a model copy, in one or more settings."""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError, SbnSurgeryError
from ..layers import SpectralBatchNorm2d
from ..progress import ProgressFn
from .figures import _Accumulator
from .maps import MapFinder
from .probes import _has, probe_points
from .report import LayerStats, Report
from .variants import VARIANTS, _check_recipe, make_variant, sbn_count

__all__ = ["diagnose", "diagnose_variant", "compare"]


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, SpectralBatchNorm2d))]


def _model_name(model: nn.Module) -> str:
    meta = getattr(model, "sbn_meta", None)
    if isinstance(meta, dict) and meta.get("model_name"):
        return str(meta["model_name"])
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def _as_images(batch: Any, index: int) -> Tensor:
    x = batch
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        x = batch.get("image", batch.get("images", batch.get("pixel_values")))
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SbnSurgeryError(
            f"diagnose: batch {index} is not a float image tensor (N, C, H, W) (got {desc}); "
            f"pass tensors or (images, labels) pairs"
        )
    return x


def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    progress: Optional[ProgressFn] = None,
    norm_stats: str = "batch",
    points: Optional[Sequence[str]] = None,
    variant: Optional[str] = None,
    label: str = "",
    model_name: Optional[str] = None,
) -> Report:
    """Measure feature maps at every probe point of a copy of ``model``.

    Args:
        model: any ``nn.Module`` (a timm model, converted or not); not modified.
        batches: image tensors (N, C, H, W) or (images, labels) pairs; figures pool all batches.
        progress: ``progress(description, completed, total, info="")``.
        norm_stats: ``"batch"`` (norm layers use batch statistics, the training forward; the
            default, see the module docstring) or ``"running"`` (plain eval mode).
        points: module paths to probe instead of :func:`probe_points`.
        variant: the name recorded in the report; guessed from the model when omitted
            (``bn``/``bn+sbn``, or ``no-bn``/``no-bn+sbn`` when BatchNorm was removed).
        label, model_name: recorded as given.
    """
    return _measure(copy.deepcopy(model), batches, progress=progress, norm_stats=norm_stats,
                    points=points, variant=variant, label=label,
                    model_name=model_name or _model_name(model))


def _measure(work: nn.Module, batches: Iterable[Any], *, progress: Optional[ProgressFn],
             norm_stats: str, points: Optional[Sequence[str]], variant: Optional[str],
             label: str, model_name: str) -> Report:
    """``diagnose`` on ``work`` itself, which it changes (modes, running statistics)."""
    if norm_stats not in ("batch", "running"):
        raise SbnSurgeryError(f"norm_stats must be 'batch' or 'running'; got {norm_stats!r}")
    work.eval()
    if norm_stats == "batch":
        for m in _norm_modules(work):
            m.train()
    sbn_layers = sbn_count(work)
    if variant is None:
        no_bn = any(getattr(m, "_sbn_no_norm", False) for m in work.modules())
        variant = ("no-bn" if no_bn else "bn") + ("+sbn" if sbn_layers else "")

    if points is None:
        found = probe_points(work)
    else:
        found = []
        for p in points:
            if not _has(work, p):
                raise ModelError(f"diagnose: no module {p!r} in {type(work).__name__}; "
                                 f"give paths as in model.named_modules()")
            found.append((p, "block", p.rpartition(".")[0]))
    if not found:
        raise ModelError(f"diagnose: found no probe points in {type(work).__name__}; "
                         f"pass points=[...] with module paths")

    finder, accs, handles = _attach(work, found)

    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise SbnSurgeryError("diagnose: no batches given; pass at least one image batch")
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    desc = f"diagnose {variant}"
    samples = 0
    input_size = None
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                x = _as_images(batch, i)
                if norm_stats == "batch" and x.shape[0] < 2:
                    raise SbnSurgeryError(
                        f"diagnose: batch {i} has {x.shape[0]} sample; batch statistics need at "
                        f"least 2 (use a larger batch, or norm_stats='running')")
                input_size = tuple(int(s) for s in x.shape[1:])
                finder.set_input(input_size[1:])
                work(x.to(device))
                samples += int(x.shape[0])
                if progress is not None:
                    progress(desc, i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()

    layers, notes = _records(found, accs, finder)
    return Report(model=model_name, variant=variant, layers=layers,
                  norm_stats=norm_stats, samples=samples, input_size=input_size,
                  sbn_layers=sbn_layers, label=label or _label(variant), notes=notes)


def _attach(work: nn.Module, found: list[tuple[str, str, str]]):
    """(map finder, accumulator per probe point, hook handles): a forward hook on each point
    feeds its output to its accumulator, which takes spectral figures on the map it holds."""
    finder = MapFinder(work)
    accs, handles = {}, []
    for path, _, _ in found:
        module = work.get_submodule(path)
        acc = _Accumulator(lambda x, p=path, m=module: finder.view(p, m, x))
        accs[path] = acc
        handles.append(module.register_forward_hook(lambda _m, _a, out, acc=acc: acc.add(out)))
    return finder, accs, handles


def _records(found: list[tuple[str, str, str]], accs: dict, finder: MapFinder
             ) -> tuple[list[LayerStats], list[str]]:
    """One LayerStats per probe point that ran (depths renumbered), and notes on the others."""
    layers, notes = [], []
    for depth, (path, kind, stage) in enumerate(found):
        acc = accs[path]
        if acc.count == 0:
            notes.append(f"{path} was not called in the forward pass")
            continue
        if acc.nonfinite:
            notes.append(f"{path} produced inf/nan values")
        layers.append(LayerStats(module=path, depth=depth, kind=kind, stage=stage,
                                 shape=acc.shape or (), layout=finder.layouts.get(path, ""),
                                 **acc.figures()))
    for new_depth, rec in enumerate(layers):
        rec.depth = new_depth
    return layers, notes


def _label(variant: str) -> str:
    for name, label, _, _ in VARIANTS:
        if name == variant:
            return label
    return variant


_VARIANT = {v[0]: v for v in VARIANTS}


def compare(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    recipe: Any = None,
    variants: Sequence[str] = tuple(_VARIANT),
    norm_stats: str = "batch",
    input_size: Optional[Sequence[int]] = None,
    progress: Optional[ProgressFn] = None,
    model_name: Optional[str] = None,
    force: bool = False,
) -> list[Report]:
    """``diagnose`` in each of ``variants`` (default: BN, BN + SBN, no BN, no BN + SBN) on the
    same batches. SBN variants use the model's own SBN layers if it is converted, else
    ``recipe``, by default the shipped recipe that fits the model's name."""
    for v in variants:
        if v not in _VARIANT:
            raise SbnSurgeryError(f"unknown variant {v!r}; choose from {', '.join(_VARIANT)}")
    _check_recipe(model, recipe)
    name = model_name or _model_name(model)
    if recipe is None and sbn_count(model) == 0 and any(_VARIANT[v][2] for v in variants):
        from ..recipe import recipe_for_model

        recipe = recipe_for_model(name)
    batches = list(batches)
    return [_run_variant(model, batches, v, recipe=recipe, norm_stats=norm_stats,
                         input_size=input_size, progress=progress, model_name=name, force=force)
            for v in variants]


def diagnose_variant(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    recipe: Any = None,
    remove_bn: bool = False,
    norm_stats: str = "batch",
    input_size: Optional[Sequence[int]] = None,
    progress: Optional[ProgressFn] = None,
    model_name: Optional[str] = None,
    force: bool = False,
) -> Report:
    """``diagnose`` in one setting: with SBN when the model has it or ``recipe`` inserts it,
    with every BatchNorm made the identity when ``remove_bn``."""
    _check_recipe(model, recipe)
    sbn = recipe is not None or sbn_count(model) > 0
    variant = ("no-bn" if remove_bn else "bn") + ("+sbn" if sbn else "")
    return _run_variant(model, batches, variant, recipe=recipe, norm_stats=norm_stats,
                        input_size=input_size, progress=progress,
                        model_name=model_name or _model_name(model), force=force)


def _run_variant(model: nn.Module, batches: Iterable[Any], variant: str, *, recipe: Any,
                 norm_stats: str, input_size: Optional[Sequence[int]],
                 progress: Optional[ProgressFn], model_name: str, force: bool = False) -> Report:
    _, label, sbn, no_bn = _VARIANT[variant]
    converted = sbn_count(model) > 0
    recipe_name = "converted" if converted else _recipe_name(recipe)
    if sbn:
        label = f"{label} ({recipe_name})"
    work = make_variant(model, recipe=None if converted else recipe, sbn=sbn, remove_bn=no_bn,
                        input_size=input_size, force=force)
    report = _measure(work, batches, progress=progress, norm_stats=norm_stats, points=None,
                      variant=variant, label=label, model_name=model_name)
    report.recipe = recipe_name if sbn else ""
    return report


def _recipe_name(recipe: Any) -> str:
    if recipe is None:
        return ""
    name = getattr(recipe, "name", None)
    if name:
        return str(name)
    return os.path.splitext(os.path.basename(str(recipe)))[0]
