"""Feature-map norms and spectra per depth: the paper's two observations, measured in a model.

``diagnose(model, batches)`` runs the batches through a copy of the model and records, at every
residual block (or stage output), in depth order:

* ``rms``: sqrt(mean(x^2)) over the whole output (batch, channels, pixels);
* ``max_abs``: max |x|;
* ``top_freq_share``: the share of a feature map's spectral energy held by its largest frequency
  component, one value per (sample, channel) map of the full orthonormal 2-D DFT, averaged over
  maps (so every channel counts equally, however large its norm);
* ``spectral_entropy``: the Shannon entropy of that map's normalized power spectrum divided by
  log(H*W): 1 for a flat spectrum, 0 for all energy in one component; averaged over maps.

Maps with zero energy are left out of the two spectral averages; the spectral figures are None
where the output is not a 4-D feature map or has a single pixel.

Probe points are found from timm's ``feature_info``: the children of each stage container it
names (the residual blocks), or the named module itself where it holds no blocks (a stem). See
:func:`probe_points`.

Norm layers run on **batch statistics** by default: the paper's observation (activations explode
with depth at initialization) is about the forward pass that training sees, and a BatchNorm at
initialization in eval mode (running mean 0, variance 1) is almost the identity, which would hide
exactly what BN does. Every other module stays in eval mode (no dropout, no drop-path), and all of
this happens on a deep copy, so the caller's model, its mode and its running statistics are
untouched. ``norm_stats="running"`` evaluates the copy in eval mode instead (trained models).

``remove_batchnorm`` neutralizes every BatchNorm in place (the paper's "without BN" setting)
while inserted SBN layers, which live as children of BatchNorm hosts, keep running.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import ModelError, SbnSurgeryError
from .layers import SpectralBatchNorm2d

__all__ = [
    "LayerStats", "Report", "VARIANTS", "diagnose", "diagnose_variant", "compare", "make_variant",
    "probe_points", "load_model",
    "remove_batchnorm", "feature_stats", "spectral_stats", "plot_rms", "rms_figure",
]

Progress = Callable[..., None]

#: The four settings of ``compare``, in plot order: (name, label, with SBN, without BN).
VARIANTS = (
    ("bn", "BN", False, False),
    ("bn+sbn", "BN + SBN", True, False),
    ("no-bn", "no BN", False, True),
    ("no-bn+sbn", "no BN + SBN", True, True),
)


# --------------------------------------------------------------------------------------------
# figures of one feature map
# --------------------------------------------------------------------------------------------
def spectral_stats(x: Tensor) -> tuple[Optional[float], Optional[float], int]:
    """(mean top-frequency share, mean normalized spectral entropy, maps counted) of a 4-D
    tensor, over its (sample, channel) maps of non-zero, finite energy, from the full
    orthonormal fft2 spectrum. (None, None, 0) for single-pixel maps or when no map counts.

    Each map is divided by its own max |x| first: the figures do not depend on scale, and an
    exploded feature map cannot overflow the float32 power spectrum."""
    if x.dim() != 4:
        raise ValueError(f"spectral_stats expects (N, C, H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h * w < 2:
        return None, None, 0
    xs = x.detach()
    xs = xs.to(torch.float64 if xs.dtype == torch.float64 else torch.float32)
    peak = xs.abs().amax(dim=(-2, -1))  # (N, C); nan/inf for a non-finite map
    keep = torch.isfinite(peak) & (peak > 0)
    count = int(keep.sum())
    if count == 0:
        return None, None, 0
    xs = xs[keep] / peak[keep].view(-1, 1, 1)  # (maps, H, W), max |x| = 1
    power = torch.fft.fft2(xs, norm="ortho").abs().square().flatten(-2)  # (maps, H*W)
    p = power / power.sum(-1, keepdim=True)  # rows sum to 1
    share = p.amax(-1).double().mean().item()
    entropy = (-torch.special.xlogy(p, p).sum(-1).double() / math.log(h * w)).mean().item()
    return share, entropy, count


def feature_stats(x: Tensor) -> dict[str, Optional[float]]:
    """rms, max_abs, top_freq_share and spectral_entropy of one output (see module docstring)."""
    acc = _Accumulator()
    acc.add(x)
    return acc.figures()


class _Accumulator:
    """Running figures of one probe point over several forward calls."""

    def __init__(self) -> None:
        self.sumsq = 0.0
        self.count = 0
        self.max_abs = 0.0
        self.share_sum = 0.0
        self.entropy_sum = 0.0
        self.maps = 0
        self.shape: Optional[tuple[int, ...]] = None
        self.nonfinite = False

    def add(self, out: Any) -> None:
        x = _first_tensor(out)
        if x is None:
            return
        x = x.detach()
        self.shape = tuple(x.shape[1:])
        if x.numel() == 0:
            return
        xs = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        peak = xs.abs().amax().item()
        self.count += xs.numel()
        if not math.isfinite(peak):
            self.nonfinite = True
            self.sumsq = self.max_abs = float("inf")
        elif peak > 0:
            # sum of squares of x / peak (no overflow), scaled back in Python's float64
            norm = torch.linalg.vector_norm(xs / peak).item()
            self.sumsq += (norm * peak) ** 2
            self.max_abs = max(self.max_abs, peak)
        if xs.dim() == 4:
            share, entropy, maps = spectral_stats(xs)
            if maps:
                self.share_sum += share * maps
                self.entropy_sum += entropy * maps
                self.maps += maps

    def figures(self) -> dict[str, Optional[float]]:
        return {
            "rms": math.sqrt(self.sumsq / self.count) if self.count else float("nan"),
            "max_abs": self.max_abs,
            "top_freq_share": self.share_sum / self.maps if self.maps else None,
            "spectral_entropy": self.entropy_sum / self.maps if self.maps else None,
        }


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    return None


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Figures of one probe point. ``depth`` counts probe points from 0 at the input side;
    ``kind`` is ``block`` (a child of a stage container) or ``feature`` (a feature_info module
    taken whole, e.g. the stem); ``stage`` the feature_info module it belongs to; ``shape`` the
    output shape without the batch dimension."""

    module: str
    depth: int
    rms: float
    max_abs: float
    top_freq_share: Optional[float]
    spectral_entropy: Optional[float]
    kind: str = "block"
    stage: str = ""
    shape: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


@dataclass
class Report:
    """What ``diagnose`` measured: one ``LayerStats`` per probe point, in depth order."""

    model: str
    variant: str
    layers: list[LayerStats]
    norm_stats: str = "batch"
    samples: int = 0
    input_size: Optional[tuple[int, int, int]] = None
    sbn_layers: int = 0
    label: str = ""
    recipe: str = ""
    notes: list[str] = field(default_factory=list)

    def blocks(self) -> list[LayerStats]:
        """The residual-block records (all records if the model has no block containers)."""
        blocks = [r for r in self.layers if r.kind == "block"]
        return blocks or list(self.layers)

    def growth(self) -> Optional[float]:
        """RMS of the last block divided by RMS of the first: how much feature maps grow with
        depth. None with fewer than two blocks or a zero first RMS."""
        blocks = self.blocks()
        if len(blocks) < 2 or not blocks[0].rms > 0:
            return None
        return blocks[-1].rms / blocks[0].rms

    def to_json(self) -> dict[str, Any]:
        growth = self.growth()
        return {
            "model": self.model,
            "variant": self.variant,
            "label": self.label or self.variant,
            "norm_stats": self.norm_stats,
            "samples": self.samples,
            "input_size": list(self.input_size) if self.input_size else None,
            "sbn_layers": self.sbn_layers,
            "recipe": self.recipe or None,
            "growth": growth if growth is None or math.isfinite(growth) else None,
            "notes": list(self.notes),
            "layers": [r.to_json() for r in self.layers],
        }


# --------------------------------------------------------------------------------------------
# probe points
# --------------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _blocks_in(path: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks a stage module holds: its children if it is a Sequential/ModuleList, those of
    its ``blocks`` child if it has one (ConvNeXt stages), its children if they are all of one
    class (RegNet stages). Blocks are composite modules: a Sequential of plain layers (a
    conv-bn-relu stem) holds none. Empty when there are no blocks."""
    inner = getattr(module, "blocks", None)
    if isinstance(module, _CONTAINERS):
        children = list(module.named_children())
    elif isinstance(inner, _CONTAINERS) and len(inner) > 0:
        children = [(f"blocks.{n}", m) for n, m in inner.named_children()]
    else:
        children = list(module.named_children())
        if len({type(m) for _, m in children}) != 1:
            return []
    if not any(_is_composite(m) for _, m in children):
        return []
    return [(f"{path}.{n}" if path else n, m) for n, m in children]


def _is_composite(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _feature_modules(model: nn.Module) -> list[str]:
    """The module paths of timm's feature_info, with gaps between siblings filled (EfficientNet
    lists blocks.0, 1, 2, 4, 6 of seven stages: 3 and 5 are probed too)."""
    info = getattr(model, "feature_info", None)
    names: list[str] = []
    for entry in info or []:
        name = entry.get("module") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            continue
        if not _has(model, name) and _has(model, name.replace("_", ".")):
            name = name.replace("_", ".")  # some timm models name FX nodes ("stages_1")
        if _has(model, name):
            names.append(name)
    out: list[str] = []
    for name in names:
        parent, _, idx = name.rpartition(".")
        if parent and idx.isdigit() and out:
            prev_parent, _, prev_idx = out[-1].rpartition(".")
            if prev_parent == parent and prev_idx.isdigit():
                out.extend(f"{parent}.{i}" for i in range(int(prev_idx) + 1, int(idx))
                           if _has(model, f"{parent}.{i}"))
        if name not in out:
            out.append(name)
    return out


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def probe_points(model: nn.Module) -> list[tuple[str, str, str]]:
    """(module path, kind, stage) of every probe point, in forward order.

    With timm's ``feature_info``: for every module it names (the stages), the blocks inside it
    (kind ``block``), or the module itself when it holds none (kind ``feature``, e.g. the stem).
    Without it: the children of the model's top-level Sequential/ModuleList children, or the
    top-level children themselves when there are none.
    """
    points: list[tuple[str, str, str]] = []
    stages = _feature_modules(model)
    if not stages:
        top = [(n, m) for n, m in model.named_children() if isinstance(m, _CONTAINERS)]
        if top:
            stages = [n for n, _ in top]
        else:
            return [(n, "feature", n) for n, _ in model.named_children()]
    for stage in stages:
        module = model.get_submodule(stage)
        blocks = _blocks_in(stage, module)
        if blocks:
            points.extend((p, "block", stage) for p, _ in blocks)
        else:
            points.append((stage, "feature", stage))
    return points


# --------------------------------------------------------------------------------------------
# variants of a model
# --------------------------------------------------------------------------------------------
def _is_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, SpectralBatchNorm2d):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    # timm's FrozenBatchNorm2d / FrozenBatchNormAct2d and torchvision's FrozenBatchNorm2d
    # are not _BatchNorm subclasses but normalize the same way.
    name = type(module).__name__
    return "BatchNorm" in name and hasattr(module, "running_mean")


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


def _sbn_count(model: nn.Module) -> int:
    return sum(isinstance(m, SpectralBatchNorm2d) for m in model.modules())


def make_variant(model: nn.Module, *, recipe: Any = None, sbn: bool = False,
                 remove_bn: bool = False, input_size: Optional[Sequence[int]] = None) -> nn.Module:
    """A copy of ``model`` in one diagnose setting; ``model`` itself is not changed.

    ``sbn=True`` keeps the SBN layers of an already converted model, or applies ``recipe``
    (a Recipe, a shipped name or a path) to a model without them; ``sbn=False`` strips any SBN.
    ``remove_bn=True`` then neutralizes every BatchNorm (:func:`remove_batchnorm`), after the
    recipe, so SBN layers hosted by BatchNorms survive.
    """
    _check_recipe(model, recipe)
    out = copy.deepcopy(model)
    has_sbn = _sbn_count(out) > 0
    if sbn and not has_sbn:
        if recipe is None:
            raise SbnSurgeryError(
                "the SBN variant needs a recipe: the model has no SpectralBatchNorm2d layers. "
                "Give one with --recipe (e.g. --recipe resnet) or pass a converted model."
            )
        from .surgery import apply_recipe

        kwargs = {"input_size": tuple(input_size)} if input_size is not None else {}
        apply_recipe(out, recipe, **kwargs)
    elif not sbn and has_sbn:
        from .surgery import strip_sbn

        out = strip_sbn(out)
    if remove_bn:
        remove_batchnorm(out)
    return out


def load_model(model: str, *, checkpoint: Optional[Union[str, os.PathLike]] = None,
               num_classes: Optional[int] = None,
               model_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """The model to diagnose: a converted checkpoint (``model`` is a .safetensors path, or
    ``checkpoint`` is one written by convert/finetune) with its SBN layers, else the timm model
    ``model`` with ``checkpoint``'s weights, or at initialization without one."""
    from .checkpoint import load_converted, read_metadata
    from .errors import CheckpointError
    from .models import create_model

    if os.path.isfile(model) or str(model).endswith(".safetensors"):
        return load_converted(model)
    if checkpoint is not None:
        try:
            meta = read_metadata(checkpoint)
        except CheckpointError:
            meta = None  # plain weights (.pth, or safetensors without converted metadata)
        if meta is not None:
            name = str(meta.get("model_name", ""))
            if name and name != model:
                raise CheckpointError(
                    f"{checkpoint} is a converted {name}, not {model}; run "
                    f"`sbn-surgery diagnose {checkpoint}` or give the matching model name"
                )
            return load_converted(checkpoint)
    return create_model(model, num_classes=num_classes, model_kwargs=model_kwargs,
                        checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------
# the measurement
# --------------------------------------------------------------------------------------------
def _check_recipe(model: nn.Module, recipe: Any) -> None:
    if recipe is not None and _sbn_count(model) > 0:
        from .errors import SurgeryError

        raise SurgeryError(
            f"the model already has {_sbn_count(model)} SBN layer(s) (a converted checkpoint); "
            "its own SBN layers are diagnosed, so leave out the recipe (--recipe)"
        )


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
    progress: Optional[Progress] = None,
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


def _measure(work: nn.Module, batches: Iterable[Any], *, progress: Optional[Progress],
             norm_stats: str, points: Optional[Sequence[str]], variant: Optional[str],
             label: str, model_name: str) -> Report:
    """``diagnose`` on ``work`` itself, which it changes (modes, running statistics)."""
    if norm_stats not in ("batch", "running"):
        raise SbnSurgeryError(f"norm_stats must be 'batch' or 'running'; got {norm_stats!r}")
    work.eval()
    if norm_stats == "batch":
        for m in _norm_modules(work):
            m.train()
    sbn_layers = _sbn_count(work)
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

    accs = {path: _Accumulator() for path, _, _ in found}
    handles = []
    for path, _, _ in found:
        acc = accs[path]
        handles.append(work.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, acc=acc: acc.add(out)))

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
                work(x.to(device))
                samples += int(x.shape[0])
                if progress is not None:
                    progress(desc, i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()

    layers = []
    notes = []
    for depth, (path, kind, stage) in enumerate(found):
        acc = accs[path]
        if acc.count == 0:
            notes.append(f"{path} was not called in the forward pass")
            continue
        if acc.nonfinite:
            notes.append(f"{path} produced inf/nan values")
        layers.append(LayerStats(module=path, depth=depth, kind=kind, stage=stage,
                                 shape=acc.shape or (), **acc.figures()))
    for new_depth, rec in enumerate(layers):
        rec.depth = new_depth
    return Report(model=model_name, variant=variant, layers=layers,
                  norm_stats=norm_stats, samples=samples, input_size=input_size,
                  sbn_layers=sbn_layers, label=label or _label(variant), notes=notes)


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
    progress: Optional[Progress] = None,
    model_name: Optional[str] = None,
) -> list[Report]:
    """``diagnose`` in each of ``variants`` (default: BN, BN + SBN, no BN, no BN + SBN) on the
    same batches. SBN variants use the model's own SBN layers if it is converted, else
    ``recipe``, by default the shipped recipe that fits the model's name."""
    for v in variants:
        if v not in _VARIANT:
            raise SbnSurgeryError(f"unknown variant {v!r}; choose from {', '.join(_VARIANT)}")
    _check_recipe(model, recipe)
    name = model_name or _model_name(model)
    if recipe is None and _sbn_count(model) == 0 and any(_VARIANT[v][2] for v in variants):
        from .recipe import recipe_for_model

        recipe = recipe_for_model(name)
    batches = list(batches)
    return [_run_variant(model, batches, v, recipe=recipe, norm_stats=norm_stats,
                         input_size=input_size, progress=progress, model_name=name)
            for v in variants]


def diagnose_variant(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    recipe: Any = None,
    remove_bn: bool = False,
    norm_stats: str = "batch",
    input_size: Optional[Sequence[int]] = None,
    progress: Optional[Progress] = None,
    model_name: Optional[str] = None,
) -> Report:
    """``diagnose`` in one setting: with SBN when the model has it or ``recipe`` inserts it,
    with every BatchNorm made the identity when ``remove_bn``."""
    _check_recipe(model, recipe)
    sbn = recipe is not None or _sbn_count(model) > 0
    variant = ("no-bn" if remove_bn else "bn") + ("+sbn" if sbn else "")
    return _run_variant(model, batches, variant, recipe=recipe, norm_stats=norm_stats,
                        input_size=input_size, progress=progress,
                        model_name=model_name or _model_name(model))


def _run_variant(model: nn.Module, batches: Iterable[Any], variant: str, *, recipe: Any,
                 norm_stats: str, input_size: Optional[Sequence[int]],
                 progress: Optional[Progress], model_name: str) -> Report:
    _, label, sbn, no_bn = _VARIANT[variant]
    converted = _sbn_count(model) > 0
    recipe_name = "converted" if converted else _recipe_name(recipe)
    if sbn:
        label = f"{label} ({recipe_name})"
    work = make_variant(model, recipe=None if converted else recipe, sbn=sbn, remove_bn=no_bn,
                        input_size=input_size)
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


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------
def plot_rms(reports: Sequence[Report], path: Union[str, os.PathLike], *,
             title: Optional[str] = None, weights: str = "") -> None:
    """Write a PNG (atomically) of :func:`rms_figure`."""
    from .checkpoint import atomic_write

    fig = rms_figure(reports, title=title, weights=weights)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def rms_figure(reports: Sequence[Report], *, title: Optional[str] = None,
               weights: str = "") -> Any:
    """A matplotlib Figure of feature-map RMS against depth, log y-axis, one line per report,
    the stages marked, and each line's growth (last block / first block) in the legend.
    ``weights`` (e.g. "at initialization") goes into the default title."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if not reports:
        raise SbnSurgeryError("plot: no reports to plot")
    fig = Figure(figsize=(9, 5.2), dpi=120)
    ax = fig.add_subplot()
    markers = "osD^vP*X"
    for i, rep in enumerate(reports):
        pts = [(r.depth, r.rms) for r in rep.layers if r.rms > 0 and math.isfinite(r.rms)]
        growth = rep.growth()
        extra = f", last/first block \u00d7{_fmt(growth)}" if growth is not None else ""
        sbn = rep.sbn_layers > 0
        # SBN variants dashed with small filled markers, so a line that coincides with another
        # (BN and BN + SBN at timm's zero-initialized residual branches) stays visible.
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--" if sbn else "-",
                marker=markers[i % len(markers)], markersize=4 if sbn else 7,
                markerfacecolor=None if sbn else "none", linewidth=1.6 if sbn else 2.4,
                label=f"{rep.label or rep.variant}{extra}")
    ax.set_yscale("log")
    first = reports[0]
    # Stage boundaries, from the first report (all variants share the probe points).
    prev = None
    for rec in first.layers:
        if rec.stage != prev:
            if prev is not None:
                ax.axvline(rec.depth - 0.5, color="0.75", linestyle=":", linewidth=1)
            ax.annotate(rec.stage, xy=(rec.depth - 0.4, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -12), textcoords="offset points", fontsize=8, color="0.35")
            prev = rec.stage
    ax.set_xlabel("depth: residual block (or stage output), from input to output")
    ax.set_ylabel("feature-map RMS (log scale)")
    if title is None:
        size = "x".join(str(s) for s in first.input_size[1:]) if first.input_size else "?"
        stats = "batch statistics" if first.norm_stats == "batch" else "running statistics"
        title = (f"{first.model}{' ' + weights if weights else ''}: feature-map RMS by depth\n"
                 f"input {size}, {first.samples} samples, norm layers on {stats}")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.93), fontsize=9)
    fig.tight_layout()
    return fig


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.3g}"
    return f"{v:.2e}"
