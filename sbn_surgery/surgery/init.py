"""Setting the inserted SBN layers' values: :func:`calibrate` (running statistics from batches),
:func:`init_identity` (each SBN exactly the identity in eval mode), :func:`carry_zero_init` (timm's
zero-init of a residual branch moves into the SBN that ends it), and :func:`synthetic_batches`
for calibrating without data.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import SurgeryError
from .insert import find_sbn
from ..progress import ProgressFn
from .plan import _REPLACED_ATTR, NORMS, _get


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    passthrough: bool = False,
    progress: Optional[ProgressFn] = None,
    total: Optional[int] = None,
) -> int:
    """Estimate the running statistics of the inserted SBN layers from ``batches``.

    Every other module runs in eval mode; each SBN restarts its statistics and takes a cumulative
    average over the batches. ``passthrough=True`` makes each SBN return its input unchanged while
    it measures, so every layer sees the original model's activations (what identity init needs).
    Returns the number of batches used. ``progress`` gets ``("calibrate", done, total)`` after
    each batch; ``total`` is the number of batches where ``batches`` has a length.
    """
    sites = [_get(model, s.module) for s in find_sbn(model)]
    if not sites:
        raise SurgeryError("calibrate: the model has no SBN layers; apply a recipe first")
    if hasattr(batches, "__len__"):  # the bar's total is what runs, not what was asked for
        total = len(batches)  # type: ignore[arg-type]
    was_training = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in sites]
    handles = []
    param = next(iter(model.parameters()), None)
    n = 0
    try:
        model.eval()
        for m in sites:
            m.reset_running_stats()
            m.momentum = None
            m.train()
            if passthrough:
                handles.append(m.register_forward_hook(lambda mod, args, out: args[0]))
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                if param is not None:
                    batch = batch.to(device=param.device, dtype=param.dtype)
                model(batch)
                n += 1
                if progress is not None:
                    progress("calibrate", n, total)
    finally:
        for h in handles:
            h.remove()
        for m, mom in zip(sites, momenta):
            m.momentum = mom
        for m, flag in was_training.items():
            m.train(flag)
    if n == 0:
        raise SurgeryError("calibrate: no batches given")
    return n


def init_identity(model: nn.Module) -> None:
    """Set gamma and beta (and, in frequency mode, flatten the statistics' spectrum) so that every
    SBN layer is exactly the identity in eval mode. Call after :func:`calibrate`.

    Channel mode: gamma = sqrt(running_var + eps), beta = running_mean; the calibrated statistics
    stay. Frequency mode: one gamma per channel cannot undo a per-frequency variance, so the
    statistics are replaced by their flat-spectrum summary (each channel's mean variance over
    frequencies, and its mean over frequencies), and gamma, beta are set to match.
    """
    for site in find_sbn(model):
        m = _get(model, site.module)
        if not m.affine or not m.track_running_stats:
            raise SurgeryError(f"{site.module}: identity init needs affine=True and running statistics")
        with torch.no_grad():
            if m.stats == "channel":
                m.weight.copy_(torch.sqrt(m.running_var + m.eps))
                m.bias.copy_(m.running_mean)
            else:
                h, w = m.running_var.shape[-2:]
                var_c = m.running_var.mean(dim=(1, 2))
                dc = m.running_mean[:, 0, 0].clone()  # S * (mean over frequencies of mu)
                m.running_var.copy_(var_c.view(-1, 1, 1).expand_as(m.running_var))
                m.running_mean.zero_()
                m.running_mean[:, 0, 0] = dc
                m.weight.copy_(torch.sqrt(var_c + m.eps))
                m.bias.copy_(dc / math.sqrt(h * w))




def _zero_affine_norm(mod: Optional[nn.Module]) -> bool:
    """A norm layer (timm's norm+act classes included) with gamma and beta all zero."""
    if not isinstance(mod, NORMS):
        return False
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or bool(weight.any()):
        return False
    return not (isinstance(bias, torch.Tensor) and bool(bias.any()))


def carry_zero_init(model: nn.Module) -> list[str]:
    """Keep a zero-initialized residual branch zero when SBN is inserted into an untrained model.

    timm zero-initializes the last norm of each residual block (``zero_init_last``) so that every
    block starts as the identity. An SBN placed after such a norm would normalize its output back to
    unit scale after the first step, and amplify its gradient by 1/sqrt(eps) before that. So the
    zero moves to the SBN, which now ends the branch: the norm's gamma becomes 1 and the SBN's 0
    (for ``replace``, the SBN takes the zero). Only norms whose gamma and beta are both all zero
    qualify, so the model's output is unchanged, and the SBN's gamma gets a gradient from the
    first step, as the norm's did. Returns the SBN paths changed. Call only on untrained weights
    (:func:`sbn_surgery.convert` does so for ``init: standard`` without a checkpoint).
    """
    changed = []
    for site in find_sbn(model):
        sbn = _get(model, site.module)
        if not sbn.affine:
            continue
        if site.position == "replace":
            norm = sbn.__dict__.get(_REPLACED_ATTR)
        elif site.position == "after":
            norm = _get(model, site.fold_into or site.target)
        else:
            continue
        if not _zero_affine_norm(norm):
            continue
        with torch.no_grad():
            sbn.weight.zero_()
            if site.position != "replace":
                norm.weight.fill_(1.0)
        changed.append(site.module)
    return changed


def synthetic_batches(input_size: tuple[int, int, int], batch_size: int, num_batches: int,
                      seed: int = 0) -> list[torch.Tensor]:
    """Random normal images (what a normalized image batch looks like to the first layer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *input_size, generator=g) for _ in range(num_batches)]
