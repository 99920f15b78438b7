"""The layout's rules, checked statically (ast, nothing imported): imports between the top-level
entries of ``sbn_surgery/`` run one way, down the layers of docs/architecture.md, with no cycle,
deferred (in-function) imports included; and no function in ``sbn_surgery/`` or ``cli/`` is
longer than a reader can hold (80 lines)."""

from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "sbn_surgery"
MAX_FUNCTION_LINES = 80

#: Every top-level entry of sbn_surgery/ and its layer: an entry imports only entries of lower
#: layers. The pipeline (timm model --recipe--> converted --finetune--> checkpoint --export-->
#: ONNX --parity--> report) reads upwards; docs/architecture.md has the same table.
LAYERS = {
    # leaf modules: the error types, version, threads, progress callback type, the schema of
    # the weights' preprocessing, the allocation budget
    "errors.py": 0, "_version.py": 0, "_threads.py": 0, "_callable.py": 0, "progress.py": 0,
    "pretrained_cfg.py": 0, "setup_report.py": 0, "alloc.py": 0,
    # leaf modules that use the errors: file safety, ONNX file I/O, name patterns, weight files,
    # the Hugging Face cache, the bounded YAML reader, image files without torch
    "files.py": 1, "onnx_io.py": 1, "patterns.py": 1, "weights.py": 1, "hub.py": 1,
    "yamlfile.py": 1, "imaging.py": 1,
    # the layer, recipes, timm models, data, serving an exported file without torch
    "layers": 2, "recipe.py": 2, "models.py": 2, "data": 2, "serving": 2,
    # --recipe-->
    "surgery": 3,
    # converting in one call, saving converted models, --export-->, --parity-->
    "convert.py": 4, "checkpoint.py": 4, "export": 4, "parity": 4,
    # --finetune-->, measuring feature maps, export then parity in one call, accuracy of files
    "train": 5, "diagnose": 5, "deploy.py": 5, "accuracy.py": 5,
    # built on train and diagnose
    "study": 6,
    # the whole pipeline on a small data set
    "quickstart.py": 7,
    # the public API
    "__init__.py": 8,
}


#: Entries that run on a serving box, where neither torch nor timm is installed: they import
#: neither (at any depth, deferred imports included) and import no entry outside this set.
TORCH_FREE = {"errors.py", "_version.py", "progress.py", "imaging.py", "onnx_io.py", "serving"}
#: What a torch-free entry never imports.
TORCH_PACKAGES = {"torch", "timm", "torchvision"}


def _entry(path: Path) -> str:
    """The top-level entry of sbn_surgery/ that ``path`` belongs to."""
    return path.relative_to(LIB).parts[0]


def _target(module: str) -> str | None:
    """The top-level entry a dotted module name inside sbn_surgery names, else None."""
    parts = module.split(".")
    if parts[0] != "sbn_surgery" or len(parts) < 2:
        return None
    return parts[1] if (LIB / parts[1]).is_dir() else parts[1] + ".py"


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts if path.name == "__init__.py" else parts[:-1]


def _imported(text: str, path: Path) -> list[tuple[str, int]]:
    """(dotted module, line) of every import in ``text``, the source of ``path``, at any depth:
    module level, inside functions, and importlib.import_module calls with a constant name."""
    found = []
    package = _package_of(path)
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            # ``from . import x`` / ``from sbn_surgery import x``: x may be a module
            found += [(f"{module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            found.append((str(node.args[0].value), node.lineno))
    return found


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) top-level entries -> where ("file:line")."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(LIB.rglob("*.py")):
        src = _entry(path)
        for module, line in _imported(path.read_text(), path):
            dst = _target(module)
            if dst is not None and dst != src and (LIB / dst).exists():
                where = f"{path.relative_to(ROOT)}:{line}"
                if where not in edges.setdefault((src, dst), []):
                    edges[(src, dst)].append(where)
    return edges


def _cycles(edges) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_scanner_sees_every_kind_of_import():
    src = ("import sbn_surgery.layers\nfrom sbn_surgery import recipe\nfrom .. import errors\n"
           "from ..export.graph import x\nfrom . import y\n"
           "def f():\n    from ..parity import check_parity\n"
           "    importlib.import_module('sbn_surgery.train')\n")
    got = {m for m, _ in _imported(src, LIB / "surgery" / "probe.py")}
    assert {"sbn_surgery.layers", "sbn_surgery.recipe", "sbn_surgery.errors",
            "sbn_surgery.export.graph", "sbn_surgery.surgery.y", "sbn_surgery.parity",
            "sbn_surgery.train"} <= got
    assert {_target(m) for m in got} - {None} == {"layers", "recipe.py", "errors.py", "export",
                                                  "surgery", "parity", "train"}


def test_cycle_finder_finds_a_deferred_two_way_import():
    edges = {("export", "parity"): [], ("parity", "export"): [], ("export", "layers"): []}
    assert _cycles(edges) == [["export", "parity", "export"]]
    assert _cycles({("a", "b"): [], ("b", "c"): []}) == []


def test_every_top_level_entry_has_a_layer():
    entries = {p.name for p in LIB.iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists())}
    missing = sorted(entries - set(LAYERS))
    assert not missing, f"place {missing} in LAYERS here and in docs/architecture.md"
    assert not set(LAYERS) - entries, "LAYERS names entries that no longer exist"


def test_no_two_entries_import_each_other():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("entry", sorted(LAYERS))
def test_imports_run_down_the_layers(entry):
    upward = {dst: where for (src, dst), where in _edges().items()
              if src == entry and LAYERS.get(dst, -1) >= LAYERS[entry]}
    assert not upward, "\n".join(
        f"{entry} (layer {LAYERS[entry]}) imports {dst} (layer {LAYERS.get(dst)}) at "
        f"{', '.join(where)}" for dst, where in upward.items())


def _torch_imports(entry: str) -> list[str]:
    """Where the files of ``entry`` import torch, timm or torchvision, or an entry of
    sbn_surgery outside TORCH_FREE ("file:line module")."""
    root = LIB / entry
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    found = []
    for path in files:
        for module, line in _imported(path.read_text(), path):
            dst = _target(module)
            bad = module.split(".")[0] in TORCH_PACKAGES or (
                dst is not None and dst != entry and (LIB / dst).exists() and dst not in TORCH_FREE)
            if bad:
                found.append(f"{path.relative_to(ROOT)}:{line} {module}")
    return found


def test_the_torch_free_rule_sees_a_deferred_torch_import(tmp_path, monkeypatch):
    probe = tmp_path / "sbn_surgery"
    (probe / "serving").mkdir(parents=True)
    (probe / "data").mkdir()
    (probe / "serving" / "x.py").write_text("def f():\n    import timm.data\n"
                                             "from ..data import y\nfrom .. import errors\n")
    (probe / "errors.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "LIB", probe)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert {w.split(" ")[1] for w in _torch_imports("serving")} == {
        "timm.data", "sbn_surgery.data", "sbn_surgery.data.y"}


@pytest.mark.parametrize("entry", sorted(TORCH_FREE))
def test_serving_entries_import_neither_torch_nor_timm(entry):
    assert set(TORCH_FREE) <= set(LAYERS)
    bad = _torch_imports(entry)
    assert not bad, f"{entry} must run without torch and timm, but imports: " + "; ".join(bad)


def _long_functions(text: str, path: Path) -> list[str]:
    tree = ast.parse(text, str(path))
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
            f"({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_long_function_finder_counts_the_def_line_and_the_body():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = LIB / "probe.py"
    assert _long_functions(f"def f():\n{body}\n", path)  # 81 lines
    assert not _long_functions(f"def f():\n{body[: body.rindex(chr(10))]}\n", path)  # 80


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix()
                                        for d in ("sbn_surgery", "cli")
                                        for p in (ROOT / d).rglob("*.py")))
def test_no_function_is_over_80_lines(path):
    assert not _long_functions((ROOT / path).read_text(), ROOT / path)


@pytest.mark.parametrize("name", ["diagnose", "study", "convert"])
def test_a_package_named_like_its_function_is_the_package_in_any_import_order(name, monkeypatch):
    import sbn_surgery

    first = getattr(sbn_surgery, name)  # the attribute before the subpackage is imported by name
    package = importlib.import_module(f"sbn_surgery.{name}")
    assert first is package is getattr(sbn_surgery, name)
    assert isinstance(package, types.ModuleType)
    monkeypatch.setattr(package, name, lambda *args, **kwargs: ("called", args, kwargs))
    assert getattr(sbn_surgery, name)(1, x=2) == ("called", (1,), {"x": 2})
