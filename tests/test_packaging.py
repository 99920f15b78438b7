"""A plain (non-editable) install must carry every package and the shipped recipes."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_cfg() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_library_package_is_listed():
    listed = set(_setuptools_cfg()["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "sbn_surgery").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_recipes_and_cli_are_mapped_to_installed_packages():
    cfg = _setuptools_cfg()
    assert cfg["package-dir"]["sbn_surgery.recipes"] == "recipes"
    assert cfg["package-dir"]["sbn_surgery_cli"] == "cli"
    assert cfg["package-data"]["sbn_surgery.recipes"] == ["*.yaml"]
    assert list((ROOT / "recipes").glob("*.yaml"))


def test_top_level_api_names_resolve():
    import sbn_surgery
    import sbn_surgery.diagnose.plot  # noqa: F401  (importing a submodule must not rebind the name)

    for name in sbn_surgery.__all__:
        assert getattr(sbn_surgery, name) is not None, name
    for fn in ("convert", "apply_recipe", "diagnose", "finetune", "export_onnx"):
        assert callable(getattr(sbn_surgery, fn)), fn
