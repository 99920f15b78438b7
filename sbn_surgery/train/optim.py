"""Optimizer, learning-rate schedule, loss, mixup and EMA, each from timm's own factory.

* Optimizer: ``timm.optim.create_optimizer_v2`` with any timm name (``--opt``). Weight decay
  goes on weights of rank >= 2 only, never on biases, normalization parameters (SBN's gamma and
  beta among them, whatever their shape) or what the model's ``no_weight_decay()`` lists, as
  timm's ``param_groups_weight_decay`` does.
* Schedule: ``timm.scheduler.create_scheduler_v2`` (``--sched``); it is a function of the
  optimizer-update count (``--sched-on-updates``) or the epoch, so a resumed run sets the same
  learning rate as the uninterrupted one, and an extended run (``--resume --epochs N``) simply
  recomputes it for the new total.
* Loss: cross-entropy with ``--smoothing``; with ``--mixup``/``--cutmix``, ``timm.data.Mixup``
  makes soft targets and timm's ``SoftTargetCrossEntropy`` scores them.
* EMA: ``timm.utils.ModelEmaV3`` of the weights *and* buffers, so the EMA model's BatchNorm and
  SBN running statistics are averages of the raw model's, consistent with its averaged weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import SbnSurgeryError
from ..layers import SpectralBatchNorm2d
from .options import RunOptions


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names kept out of weight decay: the model's ``no_weight_decay()`` and every
    parameter of an SBN layer (gamma and beta are norm parameters in every stats mode)."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, SpectralBatchNorm2d):
            names.update(f"{mod_name}.{p}" if mod_name else p
                         for p, _ in mod.named_parameters(recurse=False))
    return names


def make_optimizer(model: nn.Module, opts: RunOptions) -> torch.optim.Optimizer:
    """timm's optimizer over the trainable parameters, two groups: decay and no decay."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    groups = param_groups_weight_decay(model, opts.weight_decay,
                                       no_weight_decay_list=no_weight_decay_names(model))
    groups = [g for g in groups if g["params"]]
    extra: dict[str, Any] = {}
    if opts.opt_eps is not None:
        extra["eps"] = opts.opt_eps
    if opts.opt_betas is not None:
        extra["betas"] = tuple(opts.opt_betas)
    try:
        return create_optimizer_v2(groups, opt=opts.opt, lr=opts.lr, momentum=opts.momentum,
                                   weight_decay=opts.weight_decay, **extra)
    except (TypeError, ValueError, IndexError) as exc:
        raise SbnSurgeryError(f"--opt {opts.opt} refused its arguments ({exc}); check "
                              "--opt-betas (adan takes 3) and --opt-eps") from None


def make_scheduler(optimizer: torch.optim.Optimizer, opts: RunOptions,
                   updates_per_epoch: int) -> tuple[Any, int]:
    """(timm scheduler, total epochs including cooldown)."""
    import warnings

    from timm.scheduler import create_scheduler_v2

    with warnings.catch_warnings():  # plateau's "state not saved": scheduler_state saves it
        warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)
        try:
            return _create(create_scheduler_v2, optimizer, opts, updates_per_epoch)
        except TypeError as exc:
            if "verbose" not in str(exc):
                raise
            import timm
            import torch as _torch

            raise SbnSurgeryError(
                f"--sched {opts.sched}: timm {timm.__version__}'s scheduler passes `verbose`, "
                f"which torch {_torch.__version__} no longer takes; upgrade timm (1.0.23 or "
                "later works) or choose another --sched") from None


def _create(create_scheduler_v2: Any, optimizer: torch.optim.Optimizer, opts: RunOptions,
            updates_per_epoch: int) -> tuple[Any, int]:
    return create_scheduler_v2(
        optimizer, sched=opts.sched, num_epochs=opts.epochs,
        decay_epochs=opts.decay_epochs, decay_milestones=list(opts.decay_milestones),
        cooldown_epochs=opts.cooldown_epochs, patience_epochs=opts.patience_epochs,
        decay_rate=opts.decay_rate, min_lr=opts.min_lr, warmup_lr=opts.warmup_lr,
        warmup_epochs=opts.warmup_epochs, step_on_epochs=not updates_on_steps(opts),
        updates_per_epoch=updates_per_epoch)


def scheduler_state(sched: Any) -> dict[str, Any]:
    """What resume needs of the schedule: nothing for a function of the update count; for
    plateau the whole inner ReduceLROnPlateau state (timm's own state_dict keeps only the best
    metric, not the patience and cooldown counters)."""
    inner = getattr(sched, "lr_scheduler", None)
    return dict(inner.state_dict()) if inner is not None else {}


def load_scheduler_state(sched: Any, state: dict[str, Any]) -> None:
    inner = getattr(sched, "lr_scheduler", None)
    if inner is not None and state:
        inner.load_state_dict(state)


def updates_on_steps(opts: RunOptions) -> bool:
    """Whether the schedule moves every optimizer update (timm's plateau steps per epoch)."""
    return bool(opts.sched_on_updates) and opts.sched != "plateau"


def make_mixup(opts: RunOptions, num_classes: int) -> Optional[Any]:
    """timm's Mixup/CutMix with label smoothing, or None when both alphas are 0."""
    if not (opts.mixup > 0 or opts.cutmix > 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, prob=opts.mixup_prob,
                 switch_prob=opts.mixup_switch_prob, mode=opts.mixup_mode,
                 label_smoothing=opts.smoothing, num_classes=num_classes)


def make_criterion(opts: RunOptions, mixup: Optional[Any]) -> nn.Module:
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # the targets already carry the smoothing
    return nn.CrossEntropyLoss(label_smoothing=opts.smoothing)


def make_ema(model: nn.Module, opts: RunOptions) -> Optional[Any]:
    """timm's ModelEmaV3 of ``model`` (weights and buffers), or None without --model-ema."""
    if not opts.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=opts.model_ema_decay, use_warmup=bool(opts.model_ema_warmup))


def clip_gradients(params: list[torch.Tensor], opts: RunOptions) -> None:
    if opts.clip_grad is not None:
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad(params, opts.clip_grad, mode=opts.clip_mode)
