"""Where diagnose measures: the residual blocks of each stage timm's feature_info names."""

from __future__ import annotations

from torch import nn

__all__ = ["probe_points"]

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
