"""Recipes: declarative YAML that says where SBN goes in a family of timm models.

A recipe is validated in full before anything touches a model; every error names the file, the
line and the key. Shipped recipes live in the top-level ``recipes/`` folder, installed as the
package data ``sbn_surgery.recipes``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from .errors import RecipeError, near_names
from .patterns import check_pattern, match_pattern
from .yamlfile import YamlRules, key_text, parse_yaml, read_text

__all__ = ["Recipe", "Rule", "SbnOptions", "Expect", "load_recipe", "shipped_recipes",
           "recipe_for_model", "check_fits", "match_pattern"]

#: A recipe is a page of YAML; anything larger is refused before it is read.
MAX_RECIPE_BYTES = 1 << 20
#: Nesting depth and node count (aliases counted at each use) a recipe may have: a real recipe
#: is about 5 deep and has a few hundred nodes; the limits stop recursion and alias bombs.
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 20_000
#: How a recipe file is read (:mod:`.yamlfile`, shared with ``--config``).
RULES = YamlRules(label="recipe file", noun="a recipe", error=RecipeError,
                  shape_hint="a recipe is a flat mapping of rules. Flatten it.",
                  max_bytes=MAX_RECIPE_BYTES, max_depth=MAX_YAML_DEPTH,
                  max_nodes=MAX_YAML_NODES)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SbnOptions(_Strict):
    """Options of the inserted layers; a rule's ``sbn`` overrides the recipe's."""

    stats: Optional[Literal["channel", "frequency"]] = None
    eps: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False)
    momentum: Optional[float] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    init: Optional[Literal["auto", "identity", "standard"]] = None

    def merged(self, over: Optional["SbnOptions"]) -> "SbnOptions":
        if over is None:
            return self
        data = self.model_dump()
        data.update({k: v for k, v in over.model_dump().items() if v is not None})
        return SbnOptions(**data)


DEFAULT_SBN = SbnOptions(stats="channel", eps=1e-5, momentum=0.1, init="auto")


class Expect(_Strict):
    """How many sites a rule must match: ``exact`` or at least ``min``."""

    exact: Optional[int] = Field(default=None, ge=0)
    min: Optional[int] = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> "Expect":
        if (self.exact is None) == (self.min is None):
            raise ValueError("give exactly one of 'exact' or 'min'")
        return self

    def check(self, count: int) -> bool:
        return count == self.exact if self.exact is not None else count >= (self.min or 0)

    def describe(self) -> str:
        return f"exactly {self.exact}" if self.exact is not None else f"at least {self.min}"


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, int)) else v


class Rule(_Strict):
    """Selects modules (all given selectors must hold) and says where SBN goes."""

    name: Optional[str] = None
    types: Optional[list[str]] = None
    paths: Optional[list[str]] = None
    stages: Optional[list[int]] = None
    #: the N deepest feature stages that hold a module matching the other selectors (the deeper
    #: blocks of a model whose last stages have no such module, e.g. a conv stem before attention)
    deepest_stages: Optional[int] = Field(default=None, ge=1)
    #: the deepest share of those stages (rounded up): 0.5 takes the deeper half of a ViT's blocks
    #: whatever its depth (timm lists every block of an isotropic model as a feature stage)
    deepest_fraction: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    #: only the module that ends each residual branch (surgery/branches.py): the last weighted
    #: layer of a block, layer scales passed over, whose output is the block's feature map
    branch_end: bool = False
    #: applies only when the rules before it matched nothing; then their matching nothing is no
    #: error (``default``: BatchNorm sites where a model has them, else the branch ends)
    fallback: bool = False
    #: how the feature map at the matched point lies: found from the probe forward's shapes when
    #: not given (layers/layout.py)
    layout: Optional[Literal["nchw", "nhwc", "tokens"]] = None
    exclude: list[str] = Field(default_factory=list)
    #: keep only the last match (module order) under each parent; an integer N groups by the
    #: ancestor N levels up instead (2 when the norm sits in a conv-norm-act wrapper).
    last_in_parent: Union[bool, int] = False
    position: Literal["after", "before", "replace"] = "after"
    sbn: Optional[SbnOptions] = None
    expect: Optional[Expect] = None

    _types_v = field_validator("types", "paths", "exclude", mode="before")(_as_list)
    _stages_v = field_validator("stages", mode="before")(_as_list)

    @field_validator("last_in_parent")
    @classmethod
    def _levels(cls, v: Union[bool, int]) -> Union[bool, int]:
        if not isinstance(v, bool) and v < 0:
            raise ValueError("last_in_parent is true/false or a number of levels >= 0")
        return v

    def parent_levels(self) -> int:
        """How many path components :attr:`last_in_parent` strips to name a match's group."""
        return int(self.last_in_parent)

    @field_validator("expect", mode="before")
    @classmethod
    def _expect_int(cls, v: Any) -> Any:
        return {"exact": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("paths", "exclude")
    @classmethod
    def _patterns_compile(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for pat in v or []:
            check_pattern(pat)
        return v

    @model_validator(mode="after")
    def _has_selector(self) -> "Rule":
        if not (self.types or self.paths or self.stages or self.deepest_stages
                or self.deepest_fraction or self.branch_end):
            raise ValueError("a rule needs at least one selector: 'types', 'paths', 'stages', "
                             "'deepest_stages', 'deepest_fraction' or 'branch_end'")
        given = [k for k in ("stages", "deepest_stages", "deepest_fraction")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of 'stages', 'deepest_stages', 'deepest_fraction' (not "
                             f"both {' and '.join(repr(g) for g in given)})")
        return self

    def label(self, index: int) -> str:
        return f"rule {index + 1}" + (f" ({self.name!r})" if self.name else "")

    def path_matches(self, path: str) -> bool:
        return self.paths is None or any(match_pattern(p, path) for p in self.paths)

    def excluded(self, path: str) -> bool:
        return any(match_pattern(p, path) for p in self.exclude)


class Recipe(_Strict):
    """A validated recipe. ``text`` and ``source`` record where it came from."""

    name: str
    description: str = ""
    models: list[str] = Field(default_factory=list)
    sbn: SbnOptions = DEFAULT_SBN
    #: ``[]`` (given as such; leaving ``rules`` out is an error): no SBN, as recipes/none.yaml
    rules: list[Rule]
    _source: Optional[str] = PrivateAttr(default=None)
    _text: Optional[str] = PrivateAttr(default=None)

    @property
    def source(self) -> Optional[str]:
        return self._source

    @property
    def text(self) -> Optional[str]:
        return self._text

    _models_v = field_validator("models", mode="before")(_as_list)
    _models_re = field_validator("models")(Rule._patterns_compile.__func__)

    @field_validator("rules")
    @classmethod
    def _fallback_follows(cls, v: list[Rule]) -> list[Rule]:
        if v and v[0].fallback:
            raise ValueError("rule 1 is a fallback ('fallback: true'), but a fallback applies only "
                             "when the rules before it matched nothing, and none comes before it")
        return v

    @field_validator("sbn", mode="after")
    @classmethod
    def _fill_defaults(cls, v: SbnOptions) -> SbnOptions:
        return DEFAULT_SBN.merged(v)

    def options_for(self, rule: Rule) -> SbnOptions:
        return self.sbn.merged(rule.sbn)

    def fits_model(self, model_name: str) -> bool:
        """Whether ``model_name`` (a pretrained tag such as ``.a1_in1k`` is ignored) fits one of
        ``models``: globs, or ``re:`` regular expressions (full match)."""
        base = model_name.split(".", 1)[0]
        return not self.models or any(
            match_pattern(p, base) or match_pattern(p, model_name) for p in self.models)

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<text>") -> "Recipe":
        return _parse(text, source)

    def to_yaml_text(self) -> str:
        if self.text is not None:
            return self.text
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def check_fits(recipe: Recipe, model_name: str, force: bool = False) -> None:
    """Refuse (:class:`RecipeError`) a recipe whose ``models`` patterns do not name
    ``model_name``, unless ``force``; a recipe without ``models`` fits any model."""
    if force or recipe.fits_model(model_name):
        return
    raise RecipeError(
        f"{recipe.source or recipe.name}: recipe {recipe.name!r} is for models matching "
        f"{', '.join(recipe.models)}, not {model_name}. Use the recipe for {model_name} "
        f"({recipe_for_model(model_name)}), or --force (force=True) to apply it anyway."
    )


# --------------------------------------------------------------------------------------------
# loading, with file:line in every error
# --------------------------------------------------------------------------------------------
def _node_at(root: yaml.Node, loc: tuple) -> yaml.Node:
    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    nxt = k if key == loc[-1] else v
                    break
            if nxt is None:
                return node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def _parse(text: str, source: str) -> Recipe:
    root, data = parse_yaml(text, source, RULES)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}:1: a recipe is a YAML mapping with 'name' and 'rules'; got "
                          f"{type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            node = _node_at(root, loc) if root is not None else None
            line = f"{node.start_mark.line + 1}" if node is not None else "?"
            lines.append(f"{source}:{line}: {_problem(err, loc)}")
        raise RecipeError("invalid recipe: " + "; ".join(lines)) from None
    recipe._source = source
    recipe._text = text
    return recipe


def _problem(err: dict[str, Any], loc: tuple) -> str:
    """What is wrong at ``loc``. A key is quoted only when it looks like a field name: the file
    may be any file (e.g. one of passwords), and this line may reach a log or a web page."""
    if err["type"] != "extra_forbidden":
        return f"key '{'.'.join(str(p) for p in loc) or '<root>'}': {err['msg']}"
    allowed = _allowed_keys(loc[:-1])
    hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
    shown = key_text(loc[-1])
    if shown:
        return f"key '{'.'.join(str(p) for p in loc)}': unknown key {shown}{hint}"
    parent = ".".join(str(p) for p in loc[:-1])
    return f"a key that is not a field name{f' in {parent!r}' if parent else ''}{hint}"


def _allowed_keys(parent_loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in parent_loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in (Rule, SbnOptions, Expect):
            if cand is ann or cand in getattr(ann, "__args__", ()) or any(
                    cand in getattr(a, "__args__", ()) for a in getattr(ann, "__args__", ())):
                model = cand
                break
        else:
            return []
    return list(model.model_fields)


def _recipes_dir():
    return resources.files("sbn_surgery.recipes")


@lru_cache(maxsize=1)
def shipped_recipes() -> dict[str, str]:
    """Shipped recipe name -> YAML text."""
    out = {}
    for entry in _recipes_dir().iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    return dict(sorted(out.items()))


@lru_cache(maxsize=None)
def _parse_shipped(name: str) -> Recipe:
    return _parse(shipped_recipes()[name], f"recipes/{name}.yaml")


def load_recipe(spec: Union[str, Path, Recipe]) -> Recipe:
    """A Recipe from a Recipe, a shipped name (``resnet``) or a path to a YAML file."""
    if isinstance(spec, Recipe):
        return spec
    text_spec = str(spec)
    shipped = shipped_recipes()
    if text_spec in shipped:
        return _parse_shipped(text_spec)
    path = Path(text_spec)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in text_spec:
        return _parse(_read_recipe_file(path, shipped), str(path))
    hint = near_names(text_spec, shipped)
    raise RecipeError(
        f"no recipe named {text_spec!r}"
        + (f" (did you mean {', '.join(hint)}?)" if hint else "")
        + f". Shipped recipes: {', '.join(shipped)}; or give a path to a .yaml file."
    )


def _read_recipe_file(path: Path, shipped: dict) -> str:
    """The text of a recipe file, read by the bounded reader (:mod:`.yamlfile`): a regular file
    of at most :data:`MAX_RECIPE_BYTES`, UTF-8, never a blocking read."""
    try:
        return read_text(path, RULES)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} not found. Shipped recipes: "
                          f"{', '.join(shipped)}") from None


def recipe_for_model(model_name: str) -> str:
    """The shipped recipe meant for ``model_name`` (first match by ``models``), else ``default``.
    Recipes without ``models`` patterns are general-purpose: chosen by name only."""
    for name in shipped_recipes():
        recipe = load_recipe(name)
        if name != "default" and recipe.models and recipe.fits_model(model_name):
            return name
    return "default"
