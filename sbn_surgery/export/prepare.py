"""The export-ready copy of a model: every SBN layer replaced by its export form for a mode,
channel scales folded into the layer in front where that is exact (an affine BatchNorm, a
Linear for channels-last maps and tokens, a convolution: ``surgery.plan.fold_kind``), and what
was done per layer (SiteExport)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import ExportError
from ..layers import SpectralBatchNorm2d, map_size
from .forms import MATMUL_LAYOUTS, build_form

__all__ = ["MODES", "SiteExport", "prepare_export_model", "export_sites"]

MODES = ("fold", "matmul", "dft")


@dataclass
class SiteExport:
    """How one SBN layer was written."""

    module: str
    stats: str
    form: str  # "elementwise" | "matmul" | "dft"
    spatial_size: Optional[tuple[int, int]]  # (H, W) at the export input size
    folded_into: Optional[str] = None  # the layer whose weight/bias absorbed the channel scale
    layout: Optional[str] = None  # matmul form: "dense" | "separable"
    map_layout: str = "nchw"  # where the map lies: "nchw" | "nhwc" | "tokens"
    prefix_tokens: int = 0
    output: Optional[str] = None  # name of the graph tensor holding the layer's output
    inputs: list[str] = field(default_factory=list)  # tensors entering the layer's nodes
    nodes: int = 0


# --------------------------------------------------------------------------------------------
# sites
# --------------------------------------------------------------------------------------------
@dataclass
class _Site:
    module: str
    stats: str
    fold_into: Optional[str]


def export_sites(model: nn.Module) -> list[_Site]:
    """Every SpectralBatchNorm2d of the model, with the BatchNorm it may fold into (from the
    surgery's site records; SBN layers inserted by hand get no fold target)."""
    from ..surgery import find_sbn

    known = {s.module: s for s in find_sbn(model)}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, SpectralBatchNorm2d):
            site = known.get(name)
            out.append(_Site(name, mod.stats, site.fold_into if site is not None else None))
    return out


def _fold(model: nn.Module, path: Optional[str], layout: str, scale: torch.Tensor) -> bool:
    """Multiply the output channels of the layer at ``path`` by ``scale`` (float64) where that is
    exact in eval mode (``fold_kind``); whether it was done."""
    from ..surgery.plan import fold_kind

    if not path:
        return False
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return False
    kind = fold_kind(mod, layout)
    if kind is None or (kind == "bn" and not (mod.track_running_stats
                                              and mod.running_mean is not None)):
        return False
    target = mod.gain if kind == "gain" else mod.weight
    with torch.no_grad():
        shape = (-1,) + (1,) * (target.dim() - 1)
        target.copy_((target.double() * scale.to(target.device).view(shape)).to(target.dtype))
        if getattr(mod, "bias", None) is not None:
            mod.bias.copy_((mod.bias.double() * scale.to(mod.bias.device)).to(mod.bias.dtype))
    return True


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    head, _, leaf = path.rpartition(".")
    parent = model.get_submodule(head) if head else model
    setattr(parent, leaf, new)


def _check_exportable(model: nn.Module, sites: list[_Site]) -> None:
    for site in sites:
        sbn = model.get_submodule(site.module)
        if not sbn.track_running_stats or sbn.running_var is None:
            raise ExportError(
                f"{site.module}: SpectralBatchNorm2d with track_running_stats=False normalizes with "
                "batch statistics even in eval mode, so it has no fixed form to export; convert it "
                "with running statistics (the default) and calibrate or fine-tune it."
            )
        if site.stats == "frequency" and sbn.running_var.numel() == 0:
            raise ExportError(
                f"{site.module}: frequency-mode SBN has no running statistics yet; calibrate or "
                "fine-tune the model before exporting it."
            )


def _probe_sizes(model: nn.Module, sites: list[_Site], input_size: tuple[int, int, int]
                 ) -> dict[str, tuple[int, int]]:
    """(H, W) of the map each SBN layer sees at ``input_size``, from one eval forward."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for site in sites:
        def hook(mod, args, path=site.module):
            sizes[path] = map_size(tuple(args[0].shape), mod.layout, mod.prefix_tokens, mod.grid)
        handles.append(model.get_submodule(site.module).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_size))
    except Exception as exc:  # noqa: BLE001 - wrong channel count, maps too small, ...
        raise ExportError(
            f"the model does not run at input size {'x'.join(map(str, input_size))}: "
            f"{str(exc).rstrip('.')}. Pass the input size the model was converted at (--input-size C H W)."
        ) from None
    finally:
        for h in handles:
            h.remove()
    missing = [s.module for s in sites if s.module not in sizes]
    if missing:
        raise ExportError(
            f"SBN layer(s) {', '.join(missing[:3])} did not run in a forward pass at input size "
            f"{'x'.join(map(str, input_size))}; they cannot be exported."
        )
    return sizes


def prepare_export_model(model: nn.Module, mode: str, input_size: tuple[int, int, int], *,
                         layout: str = "auto") -> tuple[nn.Module, list[SiteExport]]:
    """A float32 eval CPU copy of ``model`` with every SBN replaced by its export form for ``mode``
    (and, in fold mode, channel scales folded into the BatchNorm in front). The caller's model is
    not touched. Returns the copy and one :class:`SiteExport` per layer."""
    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")
    if layout not in MATMUL_LAYOUTS:
        raise ExportError(f"unknown matmul layout {layout!r}; choose one of {', '.join(MATMUL_LAYOUTS)}")
    work = copy.deepcopy(model).float().eval().cpu()
    sites = export_sites(work)
    _check_exportable(work, sites)
    sizes = _probe_sizes(work, sites, input_size)
    records = []
    for site in sites:
        sbn = work.get_submodule(site.module)
        folded_into = None
        if mode == "fold" and site.stats == "channel" \
                and _fold(work, site.fold_into, sbn.layout, sbn.channel_constants()[0]):
            folded_into = site.fold_into
        form = build_form(sbn, site.module, mode, sizes[site.module], folded=folded_into is not None,
                          layout=layout)
        _replace(work, site.module, form)
        records.append(SiteExport(
            module=site.module, stats=site.stats, form=form.form, spatial_size=sizes[site.module],
            folded_into=folded_into, layout=getattr(form, "layout", None),
            map_layout=sbn.layout, prefix_tokens=sbn.prefix_tokens))
    return work, records


