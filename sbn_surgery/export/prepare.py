"""The export-ready copy of a model: every SBN layer replaced by its export form for a mode,
channel scales folded into the BatchNorm in front where that is exact, and what was done per
layer (SiteExport)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import ExportError
from ..layers import SpectralBatchNorm2d
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
    folded_into: Optional[str] = None  # BatchNorm whose weight/bias absorbed the channel scale
    layout: Optional[str] = None  # matmul form: "dense" | "separable"
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


def _foldable_bn(model: nn.Module, path: Optional[str]) -> Optional[nn.Module]:
    """The BatchNorm at ``path`` if scaling its weight and bias is exact in eval mode."""
    if not path:
        return None
    try:
        bn = model.get_submodule(path)
    except AttributeError:
        return None
    ok = (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine
          and bn.track_running_stats and bn.running_mean is not None)
    return bn if ok else None


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
    """(H, W) that each SBN layer sees at ``input_size``, from one eval forward."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for site in sites:
        def hook(mod, args, path=site.module):
            sizes[path] = tuple(int(d) for d in args[0].shape[-2:])
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
        if mode == "fold" and site.stats == "channel":
            bn = _foldable_bn(work, site.fold_into)
            if bn is not None:
                scale, _ = sbn.channel_constants()
                with torch.no_grad():
                    bn.weight.copy_((bn.weight.double() * scale.to(bn.weight.device)).float())
                    bn.bias.copy_((bn.bias.double() * scale.to(bn.bias.device)).float())
                folded_into = site.fold_into
        form = build_form(sbn, site.module, mode, sizes[site.module], folded=folded_into is not None,
                          layout=layout)
        _replace(work, site.module, form)
        records.append(SiteExport(
            module=site.module, stats=site.stats, form=form.form, spatial_size=sizes[site.module],
            folded_into=folded_into, layout=getattr(form, "layout", None)))
    return work, records


