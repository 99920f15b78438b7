"""Model surgery: match a recipe's rules to modules, insert or remove SBN, calibrate, init.

How SBN sits in a converted model (the original ``state_dict`` keys never change):

* ``after``: the SBN is a child named ``sbn`` of the matched module (the host) and a forward hook
  on the host returns ``host.sbn(output)``. In a fused norm+act module (timm ``BatchNormAct2d``)
  the SBN goes between the norm and the activation: the host is then its ``drop`` child and a
  forward pre-hook applies the SBN to the normalized input of ``drop``.
* ``before``: child ``sbn`` of the matched module, applied by a forward pre-hook to its input.
* ``replace``: the SBN stands at the matched path; the original module is kept (unregistered) on
  it so :func:`strip_sbn` can put it back.

Hooks look the SBN up as ``host.sbn`` when they run, so another module can take its place (export
forms do this). New ``state_dict`` keys are ``<host path>.sbn.{weight, bias, running_mean,
running_var, num_batches_tracked}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .errors import SurgeryError, near_names
from .layers import SpectralBatchNorm2d
from .recipe import Recipe, Rule, load_recipe

__all__ = ["Site", "Plan", "apply_recipe", "strip_sbn", "find_sbn", "calibrate", "init_identity",
           "carry_zero_init", "ProgressFn"]

ProgressFn = Callable[..., None]

#: Module classes whose affine eval output can absorb an SBN scale exactly.
FOLDABLE_NORMS = ("BatchNorm2d", "SyncBatchNorm", "BatchNormAct2d", "SyncBatchNormAct")
_SITE_ATTR = "_sbn_site"
_REPLACED_ATTR = "_sbn_replaced"


@dataclass
class Site:
    """One inserted SBN layer."""

    module: str
    target: str
    type: str
    channels: int
    stats: str
    position: str
    stage: Optional[int]
    rule: str
    fold_into: Optional[str] = None
    spatial_size: Optional[tuple[int, int]] = None

    def keys(self) -> list[str]:
        names = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        return [f"{self.module}.{n}" for n in names]


@dataclass
class Plan:
    """What a recipe did (or would do) to a model."""

    model: str
    recipe: str
    sites: list[Site] = field(default_factory=list)
    params_added: int = 0

    @property
    def count(self) -> int:
        return len(self.sites)

    def new_keys(self) -> list[str]:
        return [k for s in self.sites for k in s.keys()]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "count": self.count,
            "params_added": self.params_added,
            "sites": [
                {"module": s.module, "type": s.type, "channels": s.channels, "stats": s.stats,
                 "position": s.position}
                for s in self.sites
            ],
        }


# --------------------------------------------------------------------------------------------
# hooks (module-level functions, so converted models deep-copy and pickle)
# --------------------------------------------------------------------------------------------
def _sbn_after_hook(module: nn.Module, args, output):
    return module.sbn(output)


def _sbn_before_hook(module: nn.Module, args):
    return (module.sbn(args[0]),) + tuple(args[1:])


_HOOKS = (_sbn_after_hook, _sbn_before_hook)


# --------------------------------------------------------------------------------------------
# probing: execution order, stages and shapes
# --------------------------------------------------------------------------------------------
@dataclass
class _Probe:
    start: dict[str, int]
    end: dict[str, int]
    in_shape: dict[str, tuple]
    out_shape: dict[str, tuple]
    stage_ends: list[int]


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _probe(model: nn.Module, input_size: tuple[int, int, int]) -> _Probe:
    """One eval forward at batch 1 recording when each module starts and ends, and its shapes."""
    counter = [0]
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    in_shape: dict[str, tuple] = {}
    out_shape: dict[str, tuple] = {}
    handles = []

    def pre(name):
        def fn(mod, args):
            if name not in start:
                start[name] = counter[0]
                if args and isinstance(args[0], torch.Tensor):
                    in_shape[name] = tuple(args[0].shape)
            counter[0] += 1
        return fn

    def post(name):
        def fn(mod, args, out):
            end.setdefault(name, counter[0])
            if name not in out_shape and isinstance(out, torch.Tensor):
                out_shape[name] = tuple(out.shape)
            counter[0] += 1
        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post(name)))
    was_training = model.training
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except Exception as exc:  # noqa: BLE001
        raise SurgeryError(
            f"probe forward of {_model_name(model)} at input size {tuple(input_size)} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Pass the input "
            "size the model expects (--input-size C H W)."
        ) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    infos = getattr(model, "feature_info", None) or []
    infos = getattr(infos, "info", infos)  # timm FeatureInfo objects wrap the list
    stage_ends = [end[i["module"]] for i in infos if isinstance(i, dict) and i.get("module") in end]
    return _Probe(start, end, in_shape, out_shape, sorted(stage_ends))


def _stage_of(probe: _Probe, name: str) -> Optional[int]:
    s = probe.start.get(name)
    if s is None:
        return None
    for i, e in enumerate(probe.stage_ends):
        if s < e:
            return i
    return None


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------
def _is_norm_act(mod: nn.Module) -> bool:
    return "NormAct" in type(mod).__name__ and isinstance(getattr(mod, "drop", None), nn.Module)


def _rule_matches(rule: Rule, name: str, mod: nn.Module, probe: _Probe, n_stages: int) -> bool:
    if rule.types is not None and type(mod).__name__ not in rule.types:
        return False
    if not rule.path_matches(name) or rule.excluded(name):
        return False
    if rule.stages is not None:
        stage = _stage_of(probe, name)
        if stage is None:
            return False
        wanted = {s % n_stages for s in rule.stages if -n_stages <= s < n_stages}
        if stage not in wanted:
            return False
    return True


def _no_match_error(rule: Rule, index: int, recipe: Recipe, model: nn.Module, names: list[str],
                    probe: _Probe) -> SurgeryError:
    typed = [n for n, m in model.named_modules() if n and rule.types and type(m).__name__ in rule.types]
    pool = typed or names
    hints: list[str] = []
    for pat in rule.paths or []:
        hints += near_names(pat.replace("re:", "").replace("*", "0").replace("\\", ""), pool, n=5)
    if not hints:
        hints = pool[-5:]
    types_present = sorted({type(m).__name__ for _, m in model.named_modules()
                            if "Norm" in type(m).__name__ or "Conv" in type(m).__name__})
    sel = []
    if rule.types:
        sel.append(f"types {rule.types}")
    if rule.paths:
        sel.append(f"paths {rule.paths}")
    if rule.stages:
        sel.append(f"stages {rule.stages} (model has {len(probe.stage_ends)} feature stages)")
    if rule.deepest_stages:
        sel.append(f"deepest_stages {rule.deepest_stages}")
    return SurgeryError(
        f"{recipe.source or recipe.name}: {rule.label(index)} matches no module of "
        f"{_model_name(model)} ({', '.join(sel)}). Nearest module names: "
        f"{', '.join(dict.fromkeys(hints)) or '-'}. Norm/conv types in the model: "
        f"{', '.join(types_present) or '-'}. Fix the rule's selectors or use another recipe."
    )


def _channels_and_size(name: str, mod: nn.Module, position: str, probe: _Probe):
    shape = probe.in_shape.get(name) if position in ("before", "replace") else probe.out_shape.get(name)
    if shape is None:
        c = getattr(mod, "num_features", None) or getattr(mod, "out_channels", None)
        return c, None, None
    return (shape[1] if len(shape) == 4 else None), shape, (tuple(shape[2:]) if len(shape) == 4 else None)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def find_sbn(model: nn.Module) -> list[Site]:
    """The SBN sites of a converted model, in module order."""
    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, SpectralBatchNorm2d):
            info = mod.__dict__.get(_SITE_ATTR)
            if info is None:
                continue
            sites.append(Site(module=name, **info))
    return sites


def _all_sbn(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SpectralBatchNorm2d)]


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _ancestor(path: str, levels: int) -> str:
    """``path`` without its last ``levels`` components ("" for the root)."""
    parts = path.split(".")
    return ".".join(parts[:-levels]) if levels < len(parts) else ""


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return _get(model, head), leaf


def apply_recipe(
    model: nn.Module,
    recipe: Union[Recipe, str],
    *,
    input_size: Optional[tuple[int, int, int]] = None,
) -> Plan:
    """Insert SBN layers where ``recipe`` says; returns the plan of what was inserted.

    ``input_size`` (C, H, W) is used for one probe forward (execution order for stages, channel
    counts, and the spatial size of frequency-mode statistics); default: timm's input size.
    """
    from .models import input_size_of

    recipe = load_recipe(recipe)
    existing = _all_sbn(model)
    if existing:
        raise SurgeryError(
            f"model already has {len(existing)} SBN layer(s) (e.g. {existing[0]}); a recipe is "
            "applied once. Call strip_sbn(model) first, or start from the original model."
        )
    size = tuple(input_size) if input_size is not None else input_size_of(model)
    probe = _probe(model, size)  # type: ignore[arg-type]
    n_stages = len(probe.stage_ends)
    modules = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in modules]

    chosen: dict[str, tuple[int, Rule]] = {}
    for index, rule in enumerate(recipe.rules):
        if (rule.stages is not None or rule.deepest_stages) and n_stages == 0:
            raise SurgeryError(
                f"{recipe.source or recipe.name}: {rule.label(index)} selects by stages, but "
                f"{_model_name(model)} has no timm feature_info; select by 'paths' instead."
            )
        hits = [n for n, m in modules if _rule_matches(rule, n, m, probe, n_stages)]
        if rule.deepest_stages:  # stages are counted among those the other selectors reach
            staged = {n: _stage_of(probe, n) for n in hits}
            held = sorted({s for s in staged.values() if s is not None})
            keep = set(held[-rule.deepest_stages:])
            hits = [n for n in hits if staged[n] in keep]
        levels = rule.parent_levels()
        if levels:  # e.g. the last norm of each block, whatever the block type
            last = {_ancestor(n, levels): n for n in hits}
            hits = [n for n in hits if last[_ancestor(n, levels)] == n]
        if not hits:
            raise _no_match_error(rule, index, recipe, model, names, probe)
        if rule.expect is not None and not rule.expect.check(len(hits)):
            raise SurgeryError(
                f"{recipe.source or recipe.name}: {rule.label(index)} matched {len(hits)} module(s) "
                f"of {_model_name(model)}, expected {rule.expect.describe()} (first: "
                f"{', '.join(hits[:4])}). The model differs from what the recipe was written for."
            )
        for n in hits:
            chosen[n] = (index, rule)  # a later rule wins

    plan = Plan(model=_model_name(model), recipe=recipe.name)
    order = {n: i for i, n in enumerate(names)}
    try:  # all or nothing: a failed apply leaves the model as it was
        for name in sorted(chosen, key=order.__getitem__):
            index, rule = chosen[name]
            mod = _get(model, name)
            opts = recipe.options_for(rule)
            channels, shape, hw = _channels_and_size(name, mod, rule.position, probe)
            if shape is not None and len(shape) != 4:
                raise SurgeryError(
                    f"{rule.label(index)} matched {name} ({type(mod).__name__}), whose "
                    f"{'input' if rule.position != 'after' else 'output'} has shape {shape}, not "
                    "(N, C, H, W); SBN needs an NCHW feature map. Exclude it or choose another "
                    "point."
                )
            if channels is None:
                raise SurgeryError(
                    f"cannot tell the channel count at {name} ({type(mod).__name__}): it did not "
                    "run in the probe forward; exclude it from the rule.")
            sbn = SpectralBatchNorm2d(
                int(channels), stats=opts.stats or "channel", eps=float(opts.eps or 1e-5),
                momentum=opts.momentum,
                spatial_size=hw if opts.stats == "frequency" else None,
            )
            ref = next((t for t in list(mod.parameters()) + list(mod.buffers())
                        if t.is_floating_point()), None)
            if ref is not None:
                sbn.to(device=ref.device, dtype=ref.dtype)
            position = rule.position
            fold = name if position == "after" and type(mod).__name__ in FOLDABLE_NORMS \
                and getattr(mod, "affine", True) else None
            if position == "replace":
                parent, leaf = _parent(model, name)
                sbn.__dict__[_REPLACED_ATTR] = mod
                setattr(parent, leaf, sbn)
                path = name
            elif position == "after" and _is_norm_act(mod):
                host = mod.drop
                if hasattr(host, "sbn"):
                    raise SurgeryError(f"{name}.drop already has an attribute 'sbn'")
                host.sbn = sbn
                host.register_forward_pre_hook(_sbn_before_hook)
                path = f"{name}.drop.sbn"
            else:
                if hasattr(mod, "sbn"):
                    raise SurgeryError(
                        f"{name} already has an attribute 'sbn'; cannot host an SBN there")
                mod.sbn = sbn
                if position == "after":
                    mod.register_forward_hook(_sbn_after_hook)
                else:
                    mod.register_forward_pre_hook(_sbn_before_hook)
                path = f"{name}.sbn"
            info = dict(target=name, type=type(mod).__name__, channels=int(channels),
                        stats=sbn.stats, position=position, stage=_stage_of(probe, name),
                        rule=rule.name or f"rule {index + 1}", fold_into=fold,
                        spatial_size=hw)
            sbn.__dict__[_SITE_ATTR] = info
            plan.sites.append(Site(module=path, **info))
            plan.params_added += sum(p.numel() for p in sbn.parameters())
    except BaseException:
        strip_sbn(model)
        raise
    return plan


def strip_sbn(model: nn.Module) -> nn.Module:
    """Remove every SBN that :func:`apply_recipe` inserted; the model's state_dict is the
    original's again."""
    for site in reversed(find_sbn(model)):
        sbn = _get(model, site.module)
        if site.position == "replace":
            parent, leaf = _parent(model, site.module)
            original = sbn.__dict__[_REPLACED_ATTR]
            setattr(parent, leaf, original)
            continue
        host = _get(model, site.module.rpartition(".")[0])
        for hooks in (host._forward_hooks, host._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if fn in _HOOKS]:
                del hooks[key]
        del host.sbn
    return model


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
    Returns the number of batches used.
    """
    sites = [_get(model, s.module) for s in find_sbn(model)]
    if not sites:
        raise SurgeryError("calibrate: the model has no SBN layers; apply a recipe first")
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


def carry_zero_init(model: nn.Module) -> list[str]:
    """Keep a zero-initialized residual branch zero when SBN is inserted into an untrained model.

    timm zero-initializes the last norm of each residual block (``zero_init_last``) so that every
    block starts as the identity. An SBN placed after such a norm would normalize its output back to
    unit scale after the first step, and amplify its gradient by 1/sqrt(eps) before that. So the
    zero moves to the SBN, which now ends the branch: the norm's gamma becomes 1 and the SBN's 0
    (for ``replace``, the SBN takes the zero). The model's output is unchanged, and the SBN's gamma
    gets a gradient from the first step, as the norm's did. Returns the SBN paths changed. Call only
    on untrained weights (``init: standard``).
    """
    changed = []
    for site in find_sbn(model):
        sbn = _get(model, site.module)
        if not sbn.affine:
            continue
        if site.position == "replace":
            norm = sbn.__dict__.get(_REPLACED_ATTR)
        elif site.fold_into is not None:
            norm = _get(model, site.fold_into)
        else:
            continue
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or bool(weight.any()):
            continue
        with torch.no_grad():
            sbn.weight.zero_()
            if site.position != "replace":
                weight.fill_(1.0)
        changed.append(site.module)
    return changed


def synthetic_batches(input_size: tuple[int, int, int], batch_size: int, num_batches: int,
                      seed: int = 0) -> list[torch.Tensor]:
    """Random normal images (what a normalized image batch looks like to the first layer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *input_size, generator=g) for _ in range(num_batches)]

