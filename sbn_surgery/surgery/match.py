"""Matching a recipe's rules to modules: one probe forward records execution order, stages and
shapes; rules select modules by type, path and stage; a rule that matches nothing gets an error
that names the nearest modules and the norm/conv types the model has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import SurgeryError, near_names
from ..recipe import Recipe, Rule
from .branches import branch_ends, residual_units
from .layout import GridHints, LayoutError, MapLayout, grid_hints, infer_layout
from .plan import NORM_ACT, NORMS, _model_name


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
    hints: GridHints = field(default_factory=GridHints)
    #: module paths that end a residual branch (computed when a rule asks for them)
    ends: Optional[set[str]] = None

    def has_maps(self) -> bool:
        """Whether any module's output is a 2-D feature map, in any layout."""
        for shape in self.out_shape.values():
            if len(shape) == 4:
                return True
            if len(shape) == 3:
                try:
                    infer_layout(shape, None, self.hints)
                    return True
                except LayoutError:
                    continue
        return False


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
    if not stage_ends:
        # no timm feature_info: every residual block stands for a stage, as timm lists the
        # blocks of isotropic models
        stage_ends = [end[u] for u in residual_units(model) if u in end]
    return _Probe(start, end, in_shape, out_shape, sorted(stage_ends),
                  grid_hints(model, tuple(input_size[1:])))


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
    return isinstance(mod, NORM_ACT) and isinstance(getattr(mod, "drop", None), nn.Module)


def _rule_matches(rule: Rule, name: str, mod: nn.Module, probe: _Probe, n_stages: int) -> bool:
    if rule.types is not None and type(mod).__name__ not in rule.types:
        return False
    if not rule.path_matches(name) or rule.excluded(name):
        return False
    if rule.branch_end and name not in (probe.ends or ()):
        return False
    if rule.stages is not None:
        stage = _stage_of(probe, name)
        if stage is None:
            return False
        if stage not in {s % n_stages for s in rule.stages}:
            return False
    return True


def _check_stages(rule: Rule, index: int, recipe: Recipe, model: nn.Module, n_stages: int) -> None:
    """A stage index the model does not have is an error (it was ignored), naming the count."""
    if not rule.stages and not rule.deepest_stages and not rule.deepest_fraction:
        return
    where = f"{recipe.source or recipe.name}: {rule.label(index)}"
    if n_stages == 0:
        raise SurgeryError(f"{where} selects by stages, but {_model_name(model)} has no timm "
                           "feature_info and no repeated blocks; select by 'paths' instead.")
    bad = [s for s in rule.stages or [] if not -n_stages <= s < n_stages]
    if bad:
        raise SurgeryError(
            f"{where}: stage index {', '.join(map(str, bad))} does not exist: "
            f"{_model_name(model)} has {n_stages} feature stages (0..{n_stages - 1}, or "
            f"-{n_stages}..-1 from the end). Fix 'stages'.")


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
                            if isinstance(m, (NORMS, nn.modules.conv._ConvNd))})
    sel = []
    if rule.types:
        sel.append(f"types {rule.types}")
    if rule.paths:
        sel.append(f"paths {rule.paths}")
    if rule.stages:
        sel.append(f"stages {rule.stages} (model has {len(probe.stage_ends)} feature stages)")
    if rule.deepest_stages:
        sel.append(f"deepest_stages {rule.deepest_stages}")
    if rule.deepest_fraction:
        sel.append(f"deepest_fraction {rule.deepest_fraction}")
    if rule.branch_end:
        sel.append(f"branch_end ({len(probe.ends or ())} residual branch end(s) in the model)")
    return SurgeryError(
        f"{recipe.source or recipe.name}: {rule.label(index)} matches no module of "
        f"{_model_name(model)} ({', '.join(sel)}). Nearest module names: "
        f"{', '.join(dict.fromkeys(hints)) or '-'}. Norm/conv types in the model: "
        f"{', '.join(types_present) or '-'}. Fix the rule's selectors or use another recipe."
    )


def _site_layout(name: str, mod: nn.Module, position: str, probe: _Probe,
                 stated: Optional[str]) -> MapLayout:
    """The layout of the map SBN takes at ``name``: the module's input (``before``,
    ``replace``) or output (``after``). A module that did not run in the probe forward: its
    channel count from its attributes, NCHW unless stated. LayoutError when it is no map."""
    shape = probe.in_shape.get(name) if position in ("before", "replace") else probe.out_shape.get(name)
    if shape is None:
        c = getattr(mod, "num_features", None) or getattr(mod, "out_channels", None)
        if c is None:
            raise LayoutError("it did not run in the probe forward, so its channel count is "
                              "unknown; exclude it from the rule")
        return MapLayout(stated or "nchw", int(c), None)
    return infer_layout(shape, mod, probe.hints, stated, output=position == "after")


def _find_branch_ends(model: nn.Module, recipe: Recipe, probe: _Probe) -> None:
    """Fill ``probe.ends`` when a rule of ``recipe`` selects residual branch ends."""
    if probe.ends is None and any(r.branch_end for r in recipe.rules):
        probe.ends = set(branch_ends(model, probe).values())


def no_map_error(model: nn.Module, input_size: tuple) -> SurgeryError:
    return SurgeryError(
        f"no 2-D feature map in {_model_name(model)} at input size "
        f"{'x'.join(map(str, input_size))}: no module outputs an (N, C, H, W) or (N, H, W, C) "
        "map or tokens on a grid (N, P + H*W, C), and SBN normalizes 2-D feature maps, so there "
        "is nowhere to put it. Use a model with spatial features.")
