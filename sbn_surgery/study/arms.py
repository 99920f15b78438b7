"""Arms of a study: what each spec means, its directory name, and its model at initialization.

An arm spec is ``none`` (the model without SBN), a shipped recipe name or a recipe file path,
optionally followed by ``:channel`` or ``:frequency`` (the recipe's statistics mode overridden)
and by ``+remove-bn`` (every BatchNorm made the identity, as diagnose's no-BN variant).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from torch import nn

from ..errors import RecipeError, SbnSurgeryError
from ..recipe import Recipe, load_recipe, shipped_recipes

STATS_MODES = ("channel", "frequency")
REMOVE_BN = "+remove-bn"

#: Embedded as the ``none`` arm's recipe in its checkpoints: the shipped recipe ``none`` (no
#: rules), so they are converted files like ``convert --recipe none`` writes (export, bench,
#: diagnose and load_converted take them).
NONE_RECIPE_TEXT = shipped_recipes()["none"]


class ArmError(SbnSurgeryError):
    """An arm spec names no recipe, or asks for what its recipe cannot give."""


@dataclass(frozen=True)
class Arm:
    spec: str  # as the user wrote it
    base: str  # "none", a shipped name or a recipe path
    stats: Optional[str]  # the stats override, or None
    remove_bn: bool
    dir: str  # directory name under the study's output
    recipe: Optional[Recipe]  # None for "none"
    recipe_sha256: Optional[str] = None  # of a recipe file's text

    @property
    def recipe_name(self) -> Optional[str]:
        return None if self.recipe is None else self.recipe.name


def _split(spec: str) -> tuple[str, Optional[str], bool]:
    base, remove_bn = spec, False
    if base.endswith(REMOVE_BN):
        base, remove_bn = base[: -len(REMOVE_BN)], True
    stats = None
    head, sep, tail = base.rpartition(":")
    if sep and tail in STATS_MODES:
        base, stats = head, tail
    elif sep and not Path(base).exists():
        raise ArmError(f"arm {spec!r}: ':{tail}' is not a statistics mode; write NAME:channel or "
                       f"NAME:frequency (and NAME+remove-bn for the no-BN variant)")
    return base, stats, remove_bn


def _dir_name(base: str, stats: Optional[str], remove_bn: bool, is_file: bool) -> str:
    """``resnet:frequency`` -> ``resnet-frequency``; a recipe file ``x/my.yaml`` -> ``file-my``;
    ``+remove-bn`` stays; any other character outside ``[A-Za-z0-9._+-]`` becomes ``_``."""
    name = f"file-{Path(base).stem}" if is_file else base
    name += f"-{stats}" if stats else ""
    name += REMOVE_BN if remove_bn else ""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _fixes_stats(text: str) -> bool:
    """Whether a recipe file sets ``stats`` itself (for the whole recipe or in a rule)."""
    data = yaml.safe_load(text)
    sections = [data.get("sbn")] + [r.get("sbn") for r in data.get("rules") or []
                                    if isinstance(r, dict)]
    return any(isinstance(s, dict) and "stats" in s for s in sections)


def with_stats(recipe: Recipe, stats: str) -> Recipe:
    """``recipe`` with every layer in statistics mode ``stats`` (rule overrides included)."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["name"] = f"{recipe.name}-{stats}"
    data.setdefault("sbn", {})["stats"] = stats
    for rule in data["rules"]:
        if "stats" in (rule.get("sbn") or {}):
            rule["sbn"]["stats"] = stats
    return Recipe.from_yaml_text(yaml.safe_dump(data, sort_keys=False),
                                 source=f"{recipe.source or recipe.name} with stats: {stats}")


def parse_arm(spec: str) -> Arm:
    spec = spec.strip()
    base, stats, remove_bn = _split(spec)
    if base == "none":
        if stats:
            raise ArmError(f"arm {spec!r}: 'none' has no SBN layers, so no statistics mode; "
                           "write none (or none+remove-bn)")
        return Arm(spec, base, None, remove_bn, _dir_name(base, None, remove_bn, False), None)
    is_file = base not in shipped_recipes()
    try:
        recipe = load_recipe(base)
    except RecipeError as exc:
        raise ArmError(f"arm {spec!r}: {exc}") from None
    sha = None
    if is_file:
        text = recipe.text or ""  # as load_recipe read it (bounded), not read a second time
        sha = hashlib.sha256(text.encode()).hexdigest()
        if stats and _fixes_stats(text):
            raise ArmError(f"arm {spec!r}: the recipe file {base} sets 'stats' itself, so "
                           f":{stats} would contradict it; edit the file's sbn.stats, or leave "
                           f":{stats} out")
    if stats:
        recipe = with_stats(recipe, stats)
    return Arm(spec, base, stats, remove_bn, _dir_name(base, stats, remove_bn, is_file), recipe,
               sha)


def parse_arms(specs: Sequence[str]) -> list[Arm]:
    """Arms from their specs; ``none`` must be one of them (the baseline of every difference)."""
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise ArmError("--arms is empty; give e.g. --arms none,resnet,resnet:frequency")
    arms = [parse_arm(s) for s in specs]
    if "none" not in [a.spec for a in arms]:
        raise ArmError(f"--arms {','.join(specs)} has no 'none' arm, the baseline every arm is "
                       "compared with; add none")
    seen: dict[str, str] = {}
    for a in arms:
        if a.dir in seen:
            raise ArmError(f"arms {seen[a.dir]!r} and {a.spec!r} would share the directory "
                           f"{a.dir!r}; give each arm once (copy a recipe file to another name)")
        seen[a.dir] = a.spec
    return arms


def build_arm_model(arm: Arm, model_name: str, *, seed: int, num_classes: int,
                    checkpoint: Optional[str], model_kwargs: Optional[dict],
                    pretrained: bool = False,
                    input_size: Sequence[int], calibration: list[torch.Tensor],
                    force: bool = False) -> nn.Module:
    """The arm's model at initialization. ``torch.manual_seed(seed)`` right before timm builds it,
    so every arm of a seed starts from the same weights for every shared parameter (SBN layers
    are inserted after timm's init and draw no random numbers)."""
    from ..convert import convert
    from ..diagnose import remove_batchnorm
    from ..models import create_model

    torch.manual_seed(seed)
    size = tuple(int(v) for v in input_size)
    if arm.recipe is None:
        net = create_model(model_name, num_classes=num_classes, model_kwargs=model_kwargs,
                           checkpoint=checkpoint, pretrained=pretrained)
        net.sbn_meta = {"model_name": model_name, "model_kwargs": dict(model_kwargs or {}),
                        "num_classes": num_classes, "recipe": NONE_RECIPE_TEXT,
                        "recipe_name": "none", "input_size": list(size), "init": "none"}
    else:
        net, _ = convert(model_name, arm.recipe, checkpoint=checkpoint, pretrained=pretrained,
                         num_classes=num_classes,
                         model_kwargs=model_kwargs, calibration=calibration, input_size=size,
                         force=force)
    if arm.remove_bn:
        remove_batchnorm(net)
        net.sbn_meta["variant"] = "remove-bn"
    return net


def describe(arm: Arm) -> dict[str, Any]:
    """What study.json records of an arm (a recipe file's hash: an edited file is refused)."""
    return {"spec": arm.spec, "dir": arm.dir, "recipe_sha256": arm.recipe_sha256}
