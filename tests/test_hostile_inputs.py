"""Hostile and broken inputs: each is one red line and exit 2 (or the right numbers), never a
traceback, never a hang, and never a changed pre-existing file.

Classes: recipes, ONNX files, images and folders, fine-tuning options, non-finite training,
export atomicity.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sbn_surgery as sbn
from sbn_surgery.errors import RecipeError, SurgeryError

CLI = str(Path(sys.executable).with_name("sbn-surgery"))
SMALL = ["--input-size", "3", "32", "32"]


def one_line_error(result, *fragments: str) -> str:
    """Exit 2, exactly one non-empty stderr line starting with 'error:', no traceback."""
    code = getattr(result, "code", None)
    code = result.returncode if code is None else code
    assert code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def run_bounded(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed CLI in a subprocess that may not outlive ``timeout`` seconds."""
    env = dict(os.environ, COLUMNS="80", OMP_NUM_THREADS="1")
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def digests(folder: Path) -> dict[str, str]:
    """Path -> sha256 of every regular file under ``folder`` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# ============================================================================================
# recipes
# ============================================================================================
RULE = "rules:\n  - types: [BatchNorm2d]\n"


def _billion_laughs() -> str:
    lines = ["name: lol", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + RULE


BAD_RECIPE_TEXT = {
    "binary": (b"\xff\xfe\x00\x01name: x\n", ["not UTF-8", "byte 0"]),
    "latin1": ("name: caf\xe9\n".encode("latin-1") + RULE.encode(), ["not UTF-8", ":1:"]),
    "nul-bytes": (b"name: x\x00\n" + RULE.encode(), ["YAML syntax error"]),
    "deep-nesting": (("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), ["nested"]),
    "nesting-past-limit": (("a: " + "[" * 40 + "]" * 40 + "\n").encode(),
                           ["nested more than 32 levels"]),
    "billion-laughs": (_billion_laughs().encode(), ["expands to more than"]),
    "recursive-alias": (b"name: &n [*n]\n" + RULE.encode(), ["refers to itself"]),
    "huge-pattern": (f"name: t\nrules:\n  - paths: ['{'x' * 5000}']\n".encode(),
                     ["pattern of 5000 characters"]),
    "bad-regex": (b"name: t\nrules:\n  - paths: ['re:(']\n", ["bad regular expression"]),
    "eps-inf": (b"name: t\nsbn: {eps: .inf}\n" + RULE.encode(), ["sbn.eps"]),
    "momentum-nan": (b"name: t\nsbn: {momentum: .nan}\n" + RULE.encode(), ["sbn.momentum"]),
    "not-a-mapping": (b"- 1\n- 2\n", ["a recipe is a YAML mapping"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_RECIPE_TEXT))
def test_bad_recipe_files_are_one_line(run_cli, tmp_path, case):
    data, fragments = BAD_RECIPE_TEXT[case]
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    before = digests(tmp_path)
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL), "r.yaml", *fragments)
    assert digests(tmp_path) == before


@pytest.mark.timeout(60)
def test_recipe_file_too_large_is_refused_before_reading(run_cli, tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:  # 100 MB, sparse: it is never read
        f.truncate(100 * 1024 * 1024)
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL),
                   "big.yaml", "104857600 bytes", "at most 1048576")
    with pytest.raises(RecipeError, match="characters; a recipe has at most"):
        sbn.Recipe.from_yaml_text("#" * (2 << 20))


@pytest.mark.timeout(60)
def test_recipe_path_that_is_a_directory_or_fifo(run_cli, tmp_path):
    (tmp_path / "d.yaml").mkdir()
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", tmp_path / "d.yaml", *SMALL),
                   "is a directory")
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)  # opening it to read would block until a writer came
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", fifo, *SMALL),
                   "is not a regular file")


@pytest.mark.timeout(60)
def test_stage_index_out_of_range_names_the_stage_count(run_cli, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nrules:\n  - types: [BatchNorm2d]\n    stages: [-1, 99]\n")
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL),
                   "stage index 99 does not exist", "resnet10t has 5 feature stages")
    path.write_text("name: s\nrules:\n  - types: [BatchNorm2d]\n    stages: [-6]\n")
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL), "stage index -6")
    # the valid ends of the range still work: -5 is stage 0, 4 the last
    path.write_text("name: s\nrules:\n  - types: [BatchNorm2d]\n    stages: [-5, 4]\n")
    result = run_cli("inspect", "resnet10t", "--recipe", path, "--json", *SMALL)
    assert result.code == 0, result.stderr


CATASTROPHIC = r"re:((.|..|...)+)+[0-9]"  # exponential backtracking on a path not ending in a digit


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["paths", "exclude", "models"])
def test_catastrophic_regex_cannot_hang_a_command(tmp_path, where):
    path = tmp_path / "c.yaml"
    if where == "models":
        path.write_text(f"name: c\nmodels: ['{CATASTROPHIC}']\n{RULE}")
        recipe = sbn.load_recipe(path)
        with pytest.raises(RecipeError, match="ran past"):  # long, and not ending in a digit
            recipe.fits_model("resnet10t_custom_name")
    else:
        rule = f"paths: ['{CATASTROPHIC}']" if where == "paths" else \
            f"paths: ['*']\n    exclude: ['{CATASTROPHIC}']"  # tried on every module path
        path.write_text(f"name: c\nrules:\n  - {rule}\n")
        args = ("inspect", "resnet10t", "--recipe", path, *SMALL)
        one_line_error(run_bounded(*args, timeout=120), CATASTROPHIC, "ran past")


@pytest.mark.timeout(120)
def test_recipe_for_other_models_is_refused_unless_forced(run_cli, tmp_path):
    one_line_error(run_cli("inspect", "vgg11_bn", "--recipe", "resnet", *SMALL),
                   "recipe 'resnet' is for models matching", "not vgg11_bn", "(vgg)", "--force")
    path = tmp_path / "m.yaml"
    path.write_text(f"name: m\nmodels: ['resnet5*', 're:effic.*']\n{RULE}")
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL),
                   "resnet5*, re:effic.*", "not resnet10t")
    out = tmp_path / "c.safetensors"
    one_line_error(run_cli("convert", "resnet10t", "--recipe", path, "-o", out, *SMALL), "--force")
    assert not out.exists()
    forced = run_cli("inspect", "resnet10t", "--recipe", path, "--force", "--json", *SMALL)
    assert forced.code == 0, forced.stderr
    # the Python API: force= on apply_recipe and convert; recipes without `models` fit any model
    import timm
    with pytest.raises(RecipeError, match="not resnet10t"):
        sbn.apply_recipe(timm.create_model("resnet10t"), "densenet", input_size=(3, 32, 32))
    plan = sbn.apply_recipe(timm.create_model("resnet10t"), "densenet", input_size=(3, 32, 32),
                            force=True)
    assert plan.count > 0
    with pytest.raises(RecipeError, match="not resnet10t"):
        sbn.convert("resnet10t", path, input_size=(3, 32, 32))
    model, plan = sbn.convert("resnet10t", path, input_size=(3, 32, 32), init="standard",
                              force=True)
    assert plan.count > 0
    # a checkpoint converted with force loads again (its recipe is not checked a second time)
    sbn.save_converted(model, out)
    assert sbn.find_sbn(sbn.load_converted(out))


def test_surgery_stage_errors_are_surgery_errors():
    import timm
    bad = sbn.Recipe.from_yaml_text("name: s\nrules:\n  - types: [BatchNorm2d]\n    stages: [5]\n")
    with pytest.raises(SurgeryError, match="has 5 feature stages"):
        sbn.apply_recipe(timm.create_model("resnet10t"), bad, input_size=(3, 32, 32))

