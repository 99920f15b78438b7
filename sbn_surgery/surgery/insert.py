"""Inserting and removing SBN: the forward hooks that apply it, :func:`apply_recipe`,
:func:`strip_sbn`, and :func:`find_sbn`, which reads the sites back from a converted model.

Where each SBN sits (``after``, ``before``, ``replace``) and the ``state_dict`` keys it adds are
described in the package docstring (:mod:`sbn_surgery.surgery`).
"""

from __future__ import annotations

import math
from typing import Optional, Union

from torch import nn

from ..errors import SurgeryError
from ..layers import SpectralBatchNorm2d
from ..recipe import Recipe, Rule, check_fits, load_recipe
from ..models import input_size_of
from .layout import LayoutError
from .match import (_check_stages, _find_branch_ends, _is_norm_act, _no_match_error, _probe,
                    _Probe, _rule_matches, _site_layout, _stage_of, no_map_error)
from .plan import (_REPLACED_ATTR, _SITE_ATTR, Plan, Site, _ancestor, _get, _model_name, _parent,
                   fold_kind)


# --------------------------------------------------------------------------------------------
# hooks (module-level functions, so converted models deep-copy and pickle)
# --------------------------------------------------------------------------------------------
def _sbn_after_hook(module: nn.Module, args, output):
    return module.sbn(output)


def _sbn_before_hook(module: nn.Module, args):
    return (module.sbn(args[0]),) + tuple(args[1:])


_HOOKS = (_sbn_after_hook, _sbn_before_hook)


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


def apply_recipe(
    model: nn.Module,
    recipe: Union[Recipe, str],
    *,
    input_size: Optional[tuple[int, int, int]] = None,
    force: bool = False,
) -> Plan:
    """Insert SBN layers where ``recipe`` says; returns the plan of what was inserted.

    ``input_size`` (C, H, W) is used for one probe forward (execution order for stages, channel
    counts, the layout of each map, and the spatial size of frequency-mode statistics); default:
    timm's input size. A model with no 2-D feature map anywhere is refused.
    A recipe whose ``models`` patterns do not name the model (its timm architecture) is refused
    unless ``force``.
    """
    recipe = load_recipe(recipe)
    if getattr(model, "pretrained_cfg", None):  # a timm model: its name is known
        check_fits(recipe, _model_name(model), force)
    existing = _all_sbn(model)
    if existing:
        raise SurgeryError(
            f"model already has {len(existing)} SBN layer(s) (e.g. {existing[0]}); a recipe is "
            "applied once. Call strip_sbn(model) first, or start from the original model."
        )
    size = tuple(input_size) if input_size is not None else input_size_of(model)
    probe = _probe(model, size)  # type: ignore[arg-type]
    if not probe.has_maps():
        raise no_map_error(model, size)
    _find_branch_ends(model, recipe, probe)
    names = [n for n, _ in model.named_modules() if n]
    chosen = _choose_sites(model, recipe, probe, names)
    plan = Plan(model=_model_name(model), recipe=recipe.name)
    order = {n: i for i, n in enumerate(names)}
    try:  # all or nothing: a failed apply leaves the model as it was
        for name in sorted(chosen, key=order.__getitem__):
            index, rule = chosen[name]
            site, sbn = _insert_site(model, name, index, rule, recipe.options_for(rule), probe)
            plan.sites.append(site)
            plan.params_added += sum(p.numel() for p in sbn.parameters())
    except BaseException:
        strip_sbn(model)
        raise
    return plan


def _choose_sites(model: nn.Module, recipe: Recipe, probe: _Probe, names: list[str]
                  ) -> dict[str, tuple[int, Rule]]:
    """Module path -> (rule index, rule) of every module the recipe selects; a later rule wins.
    A ``fallback`` rule applies only when the rules before it matched nothing."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, tuple[int, Rule]] = {}
    for index, rule in enumerate(recipe.rules):
        if rule.fallback and chosen:
            continue
        hits = _select(rule, index, recipe, model, modules, probe)
        if not hits:
            if any(r.fallback for r in recipe.rules[index + 1:]):
                continue
            raise _no_match_error(rule, index, recipe, model, names, probe)
        if rule.expect is not None and not rule.expect.check(len(hits)):
            raise SurgeryError(
                f"{recipe.source or recipe.name}: {rule.label(index)} matched {len(hits)} module(s) "
                f"of {_model_name(model)}, expected {rule.expect.describe()} (first: "
                f"{', '.join(hits[:4])}). The model differs from what the recipe was written for."
            )
        for n in hits:
            chosen[n] = (index, rule)
    return chosen


def _select(rule: Rule, index: int, recipe: Recipe, model: nn.Module,
            modules: list[tuple[str, nn.Module]], probe: _Probe) -> list[str]:
    """The module paths one rule selects, in module order."""
    n_stages = len(probe.stage_ends)
    _check_stages(rule, index, recipe, model, n_stages)
    hits = [n for n, m in modules if _rule_matches(rule, n, m, probe, n_stages)]
    if rule.deepest_stages or rule.deepest_fraction:
        # stages are counted among those the other selectors reach
        staged = {n: _stage_of(probe, n) for n in hits}
        held = sorted({s for s in staged.values() if s is not None})
        count = rule.deepest_stages or math.ceil(rule.deepest_fraction * len(held))
        keep = set(held[-count:]) if held else set()
        hits = [n for n in hits if staged[n] in keep]
    levels = rule.parent_levels()
    if levels:  # e.g. the last norm of each block, whatever the block type
        last = {_ancestor(n, levels): n for n in hits}
        hits = [n for n in hits if last[_ancestor(n, levels)] == n]
    return hits


def _new_sbn(name: str, mod: nn.Module, index: int, rule: Rule, opts, probe: _Probe):
    """The SBN for the feature map at ``name`` (on the module's device and dtype), laid out as
    the map is there, and that layout (with the map's grid in the probe)."""
    try:
        lay = _site_layout(name, mod, rule.position, probe, rule.layout)
    except LayoutError as exc:
        what = "input" if rule.position != "after" else "output"
        shape = (probe.in_shape if what == "input" else probe.out_shape).get(name)
        has = f", whose {what} has shape {shape}" if shape is not None else ""
        raise SurgeryError(
            f"{rule.label(index)} matched {name} ({type(mod).__name__}){has}: {exc}. SBN "
            "needs a 2-D feature map: exclude it from the rule or choose another point."
        ) from None
    frequency = opts.stats == "frequency"
    if frequency and lay.hw is None:
        raise SurgeryError(f"{rule.label(index)} matched {name} ({type(mod).__name__}), which did "
                           "not run in the probe forward; frequency mode needs its spatial size. "
                           "Exclude it from the rule.")
    sbn = SpectralBatchNorm2d(
        lay.channels, stats=opts.stats or "channel", eps=float(opts.eps or 1e-5),
        momentum=opts.momentum, spatial_size=lay.hw if frequency else None,
        layout=lay.layout, prefix_tokens=lay.prefix,
        grid=lay.hw if lay.layout == "tokens" else None,
    )
    ref = next((t for t in list(mod.parameters()) + list(mod.buffers())
                if t.is_floating_point()), None)
    if ref is not None:
        sbn.to(device=ref.device, dtype=ref.dtype)
    return sbn, lay


def _attach(model: nn.Module, name: str, mod: nn.Module, sbn: SpectralBatchNorm2d,
            position: str) -> str:
    """Put ``sbn`` at ``position`` of the module at ``name``; returns the SBN's module path.
    The hooks go first (``prepend``), so hooks a user put on the host see the SBN's output."""
    if position == "replace":
        parent, leaf = _parent(model, name)
        sbn.__dict__[_REPLACED_ATTR] = mod
        setattr(parent, leaf, sbn)
        return name
    if position == "after" and _is_norm_act(mod):
        host = mod.drop
        if hasattr(host, "sbn"):
            raise SurgeryError(f"{name}.drop already has an attribute 'sbn'")
        host.sbn = sbn
        host.register_forward_pre_hook(_sbn_before_hook, prepend=True)
        return f"{name}.drop.sbn"
    if hasattr(mod, "sbn"):
        raise SurgeryError(
            f"{name} already has an attribute 'sbn'; cannot host an SBN there")
    mod.sbn = sbn
    if position == "after":
        mod.register_forward_hook(_sbn_after_hook, prepend=True)
    else:
        mod.register_forward_pre_hook(_sbn_before_hook, prepend=True)
    return f"{name}.sbn"


def _insert_site(model: nn.Module, name: str, index: int, rule: Rule, opts, probe: _Probe
                 ) -> tuple[Site, SpectralBatchNorm2d]:
    """Insert one SBN at the module ``name`` as ``rule`` says; its site record and the layer."""
    mod = _get(model, name)
    sbn, lay = _new_sbn(name, mod, index, rule, opts, probe)
    # SBN takes the module's output (a fused norm+act's normalized output, before its
    # activation): a per-channel scale folds into the module where that is exact
    fold = name if rule.position == "after" and fold_kind(mod, lay.layout) else None
    path = _attach(model, name, mod, sbn, rule.position)
    info = dict(target=name, type=type(mod).__name__, channels=sbn.num_features,
                stats=sbn.stats, position=rule.position, stage=_stage_of(probe, name),
                rule=rule.name or f"rule {index + 1}", fold_into=fold, spatial_size=lay.hw,
                layout=lay.layout, prefix_tokens=lay.prefix)
    sbn.__dict__[_SITE_ATTR] = info
    return Site(module=path, **info), sbn


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
