"""The model, its data config and its optimizer for a fine-tuning run.

* A timm name is converted first (``sbn_surgery.convert`` with ``--recipe``, by default the
  shipped recipe for its family, and the weights of ``--checkpoint`` or ``--pretrained``; SBN
  statistics calibrated on the run's own training images); a converted checkpoint is loaded as
  it is (``load_converted``).
* Images are preprocessed as the weights expect (their ``pretrained_cfg``: mean, std,
  interpolation, crop), unless timm's flags (``--mean``, ``--std``, ...) say otherwise; what the
  run used is recorded in the checkpoints' metadata (:func:`record_preprocessing`), with the
  data's class names.
  The classifier is reset (timm ``reset_classifier``) when its class count differs from the data.
* ``--train all|norm|sbn``: which parameters train. The classifier always trains: after a head
  reset it is random, and a frozen random head cannot learn anything.
* ``--drop``/``--drop-path`` are timm's ``drop_rate``/``drop_path_rate``, given to
  ``create_model`` when a timm name is built (and stored with the converted model's arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..data import Dataset, calibration_batches, data_config_for, default_input_size
from ..data.transforms import EVAL_FLAGS, fit_channels
from ..errors import CheckpointError, SbnSurgeryError
from ..layers import SpectralBatchNorm2d
from ..setup_report import HeadReset, SetupReport
from .options import RunOptions

#: Batches of real training images used to calibrate SBN statistics when converting.
CALIBRATION_BATCHES = 4


def _in_chans(model_kwargs: Optional[dict]) -> int:
    return int((model_kwargs or {}).get("in_chans", 3))


def _input_size(opts: RunOptions, ds: Dataset, model: nn.Module, in_chans: int,
                meta: Optional[dict] = None) -> tuple[int, int, int]:
    """--input-size, else the checkpoint's size when its SBN statistics belong to one spatial
    size (frequency mode), else ``data.default_input_size``."""
    from ..models import input_size_of

    fixed = [m.spatial_size for m in model.modules()
             if isinstance(m, SpectralBatchNorm2d) and m.spatial_size is not None]
    stored = tuple(int(v) for v in meta["input_size"]) if meta and meta.get("input_size") else None
    if opts.input_size is not None:
        size = tuple(int(v) for v in opts.input_size)
        if fixed and stored is not None and size[1:] != stored[1:]:
            raise SbnSurgeryError(
                f"--input-size {' '.join(map(str, size))} differs from the size this model's "
                f"frequency-mode SBN statistics belong to ({' '.join(map(str, stored))}; e.g. "
                f"{fixed[0][0]}x{fixed[0][1]} at the first such layer); train at that size, or "
                "convert again at the new size"
            )
        return size  # type: ignore[return-value]
    if fixed and stored is not None:
        return stored  # type: ignore[return-value]
    return default_input_size(ds, input_size_of(model), in_chans)


def model_kwargs_of(model_kwargs: Optional[dict], drop: Optional[float],
                    drop_path: Optional[float]) -> dict[str, Any]:
    """timm create_model arguments: --model-kwargs plus --drop and --drop-path."""
    kwargs = dict(model_kwargs or {})
    for name, key, value in (("drop", "drop_rate", drop), ("drop_path", "drop_path_rate",
                                                           drop_path)):
        if value is not None:
            if key in kwargs and kwargs[key] != value:
                raise SbnSurgeryError(f"--model-kwargs {key}={kwargs[key]} and --"
                                      f"{name.replace('_', '-')} {value} disagree; give one")
            kwargs[key] = value
    return kwargs


def is_checkpoint_path(spec: Union[str, Path]) -> bool:
    s = str(spec)
    return s.endswith(".safetensors") or Path(s).is_file()


def eval_flags(opts: RunOptions) -> dict[str, Any]:
    """timm's eval flags the run was given (mean, std, interpolation, crop_pct, crop_mode)."""
    return {k: getattr(opts, k) for k in EVAL_FLAGS if getattr(opts, k) is not None}


def build_model(spec: Union[str, Path, nn.Module], opts: RunOptions, ds: Dataset,
                progress=None, download: bool = True,
                report: Optional[SetupReport] = None) -> tuple[nn.Module, dict]:
    """(model with ``sbn_meta`` and a head for ``ds``, timm data config for it). ``download``:
    whether ``--pretrained``/``hf-hub:`` weights may be downloaded (not when only a --config
    file asks for them). ``report`` gets a head reset and the calibration images."""
    from ..checkpoint import load_converted
    from ..convert import convert
    from ..models import create_model
    from ..recipe import recipe_for_model

    if isinstance(spec, nn.Module):
        model = spec
        meta = getattr(model, "sbn_meta", None)
        if not isinstance(meta, dict):
            raise CheckpointError("finetune needs a converted model (with .sbn_meta): pass a timm "
                                  "name with a recipe, a converted checkpoint, or convert(...)'s "
                                  "model")
        in_chans = _in_chans(meta.get("model_kwargs"))
        size = _input_size(opts, ds, model, in_chans, meta)
    elif is_checkpoint_path(spec):
        if not Path(spec).is_file():
            raise CheckpointError(f"checkpoint {spec} not found; give a converted checkpoint "
                                  f"(.safetensors from `sbn-surgery convert` or `finetune`) or a "
                                  f"timm model name")
        given = [name for name, value in (("--recipe", opts.recipe),
                                          ("--checkpoint", opts.checkpoint),
                                          ("--checkpoint-key", opts.checkpoint_key),
                                          ("--pretrained", opts.pretrained),
                                          ("--num-classes", opts.num_classes),
                                          ("--model-kwargs", opts.model_kwargs),
                                          ("--drop", opts.drop),
                                          ("--drop-path", opts.drop_path)) if value]
        if given:
            raise SbnSurgeryError(f"{spec} is already converted: {', '.join(given)} appl"
                                  f"{'ies' if len(given) == 1 else 'y'} to a timm model name "
                                  "only; leave it out")
        model = load_converted(spec)
        meta = model.sbn_meta
        in_chans = _in_chans(meta.get("model_kwargs"))
        size = _input_size(opts, ds, model, in_chans, meta)
    else:
        kwargs = model_kwargs_of(opts.model_kwargs, opts.drop, opts.drop_path)
        in_chans = _in_chans(kwargs)
        n_cls = opts.num_classes or ds.num_classes
        weights = dict(checkpoint=opts.checkpoint, pretrained=bool(opts.pretrained),
                       download=download)
        probe = create_model(str(spec), num_classes=n_cls, model_kwargs=kwargs,
                             with_weights=False, **weights)  # the weights' preprocessing
        size = _input_size(opts, ds, probe, in_chans)
        cfg = data_config_for(probe, size, in_chans, eval_flags(opts))
        del probe
        calib = calibration_batches(ds, cfg, min(opts.batch_size, 32), CALIBRATION_BATCHES,
                                    subset=opts.subset)
        recipe = opts.recipe or recipe_for_model(str(spec))
        model, _ = convert(str(spec), recipe, checkpoint_key=opts.checkpoint_key,
                           num_classes=n_cls, model_kwargs=kwargs, calibration=calib,
                           input_size=size, progress=progress, force=bool(opts.force),
                           calibration_source=_calibration_source(opts), report=report,
                           **weights)
    reset_head(model, ds.num_classes, report)
    return model, data_config_for(model, size, in_chans, eval_flags(opts))


def record_preprocessing(model: nn.Module, cfg: dict, classes: list[str]) -> None:
    """Store in ``model.sbn_meta["pretrained_cfg"]`` what the run feeds the model: timm's eval
    data config ``cfg`` and the data's class names (kept only within the metadata's bounds), so
    the checkpoints say how to preprocess images for them and what each output is."""
    from ..pretrained_cfg import check_cfg

    meta = getattr(model, "sbn_meta", None)
    if not isinstance(meta, dict):
        return
    kept: dict[str, Any] = {k: list(cfg[k]) if isinstance(cfg[k], (tuple, list)) else cfg[k]
                            for k in ("input_size", *EVAL_FLAGS) if cfg.get(k) is not None}
    kept["num_classes"] = int(getattr(model, "num_classes", len(classes)))
    if len(classes) == kept["num_classes"]:
        kept["label_names"] = [str(c) for c in classes]
    meta["pretrained_cfg"] = check_cfg(kept, drop_bad_labels=True)  # names beyond the bounds


def _calibration_source(opts: RunOptions) -> str:
    source = f"{opts.data}" + (f" (--dataset {opts.dataset})" if opts.dataset else "")
    return source + (f", the {opts.subset}-image --subset" if opts.subset else "")


def reset_head(model: nn.Module, num_classes: int, report: Optional[SetupReport] = None) -> None:
    current = getattr(model, "num_classes", None)
    if current == num_classes:
        return
    if not hasattr(model, "reset_classifier"):
        raise SbnSurgeryError(f"the model has {current} classes, the data {num_classes}, and "
                              f"{type(model).__name__} has no reset_classifier(); give "
                              f"--num-classes {num_classes} when converting")
    model.reset_classifier(num_classes)
    if isinstance(getattr(model, "sbn_meta", None), dict):
        model.sbn_meta["num_classes"] = num_classes
    if report is not None:
        report.head = HeadReset(current, num_classes, "data")


def _classifier_params(model: nn.Module) -> list[nn.Parameter]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        return list(head.parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def select_trainable(model: nn.Module, mode: str) -> int:
    """Set ``requires_grad`` per ``--train``; returns the number of trainable parameters."""
    from torch.nn.modules.batchnorm import _NormBase

    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if mode == "sbn":
            kinds: tuple = (SpectralBatchNorm2d,)
        else:
            kinds = (SpectralBatchNorm2d, _NormBase, nn.GroupNorm, nn.LayerNorm)
        keep = {id(p) for p in _classifier_params(model)}
        found = 0
        for m in model.modules():
            if isinstance(m, kinds):
                found += 1
                keep.update(id(p) for p in m.parameters(recurse=False))
        if found == 0:
            raise SbnSurgeryError(f"--train {mode}: the model has no "
                                  f"{'SBN' if mode == 'sbn' else 'normalization'} layers; use "
                                  f"--train all")
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, "sbn_meta", {}) or {}
    return {"model_name": meta.get("model_name"), "recipe": meta.get("recipe_name"),
            "sbn_layers": sum(isinstance(m, SpectralBatchNorm2d) for m in model.modules())}


def eval_preprocessing(ds: Dataset, data_config: dict) -> dict:
    """timm's eval data config of what this run's validation really does to an image, for
    :func:`record_preprocessing` (and so for ``export``'s metadata): the built-in sources are
    resized by PIL to the whole input size (``data.transforms.resize_like_pil``), which is timm's
    eval transform with crop_pct 1.0 in squash mode; images read from files go through timm's
    eval transform for the data config as it is (``random`` interpolation, a training choice,
    is bilinear there)."""
    cfg = fit_channels(data_config)
    if cfg.get("interpolation") == "random":
        cfg["interpolation"] = "bilinear"
    if ds.kind == "tensor":
        cfg.update(crop_pct=1.0, crop_mode="squash")
    return cfg
