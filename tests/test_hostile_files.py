"""Hostile files, round 2: what a file holds never comes back in an error, --config is read by
the recipes' bounded reader, metadata cannot make a model larger than its tensors, and a tar
member cannot climb out of its archive. Each is one red line and exit 2, in bounded time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import one_line_error

import sbn_surgery as sbn
from sbn_surgery.errors import RecipeError, SbnSurgeryError

SMALL = ["--input-size", "3", "32", "32"]
#: What a password or credentials file holds: none of it may come back in an error.
SECRETS = ("hunter2", "s3cret", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "root:x:0:0")


def _no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


# ============================================================================================
# error messages never echo what a file holds
# ============================================================================================
LEAKY = {  # keys that are not option names: each one's line is given, never its text
    "credentials": '"AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG": 1\n"password = hunter2": 2\n',
    "passwd-lines": '"root:x:0:0:root:/root:/bin/bash": 1\n"alice s3cret": 2\n',
    "long-identifier": f"{'s3cret' * 10}: 1\n",
}


def _lines_of(text: str, first: int) -> list[int]:
    """The line numbers of ``text``'s lines once it follows ``first - 1`` other lines."""
    return list(range(first, first + text.count("\n")))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(LEAKY))
def test_recipe_keys_that_are_not_field_names_are_not_echoed(run_cli, tmp_path, case):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nrules:\n  - types: [BatchNorm2d]\n" + LEAKY[case])
    line = one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL),
                          "a key that is not a field name", "allowed: name")
    _no_secret(line)
    for n in _lines_of(LEAKY[case], 4):
        assert f"r.yaml:{n}: a key that is not a field name" in line, line
    with pytest.raises(RecipeError) as info:  # the Python API says the same
        sbn.load_recipe(path)
    _no_secret(str(info.value))


@pytest.mark.timeout(60)
def test_recipe_keys_that_look_like_field_names_are_quoted(run_cli, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nrules:\n  - types: [BatchNorm2d]\n    where: after\n"
                    "    'hunter2 is the password': 1\n")
    line = one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL),
                          "r.yaml:4: key 'rules.0.where': unknown key 'where'",
                          "r.yaml:5: a key that is not a field name in 'rules.0'")
    _no_secret(line)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(LEAKY))
def test_config_keys_that_are_not_option_names_are_not_echoed(run_cli, tmp_path, case):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 1\nfoo_bar: 3\n" + LEAKY[case])
    out = tmp_path / "run"
    line = one_line_error(run_cli("finetune", "resnet10t", "--data", "synthetic", "--config",
                                  path, "-o", out), "run.yaml: unknown option 'foo_bar' (line 2)",
                          "not an option name" if LEAKY[case].count("\n") == 1 else
                          "not option names")
    _no_secret(line)
    lines = _lines_of(LEAKY[case], 3)
    where = f"(line {lines[0]})" if len(lines) == 1 else f"(lines {', '.join(map(str, lines))})"
    assert f"{len(lines)} key" in line and where in line, line
    assert not out.exists()


@pytest.mark.timeout(60)
def test_password_file_as_config_or_recipe_is_not_echoed(run_cli, tmp_path):
    """A real /etc/passwd and /etc/shadow layout, with one 'key: value' line: a YAML error that
    names the line, and nothing of the file."""
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\nalice:$6$hunter2$s3cret:19000:0:99999:7:::\n"
                    "alice: s3cret\n")
    for args in (("finetune", "resnet10t", "--data", "synthetic", "--config", path, "-o",
                  tmp_path / "run"), ("inspect", "resnet10t", "--recipe", path, *SMALL)):
        line = one_line_error(run_cli(*args), "passwd:", "YAML syntax error")
        _no_secret(line)


@pytest.mark.timeout(60)
def test_timm_config_notice_names_unknown_keys_only_when_they_look_like_options(tmp_path):
    from sbn_surgery.train.config import load_config

    path = tmp_path / "args.yaml"
    path.write_text("model: resnet10t\nlr_noise_pct: 0.67\nmy_tweak: 1\n"
                    '"AKIAIOSFODNN7EXAMPLE hunter2": 2\n')
    _, notes = load_config(path)
    assert len(notes) == 1 and "unknown key 'my_tweak' (line 3)" in notes[0], notes
    assert "1 key that is not an option name (line 4)" in notes[0], notes
    _no_secret(notes[0])


@pytest.mark.timeout(60)
def test_snapshot_config_json_values_are_not_echoed(run_cli, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    import timm
    from safetensors.torch import save_file as save

    save(timm.create_model("resnet10t", num_classes=10).state_dict(), snap / "model.safetensors")
    for bad in ({"architecture": "AKIAIOSFODNN7EXAMPLE hunter2 " * 20},
                {"architecture": "resnet10t", "num_classes": "hunter2"}):
        (snap / "config.json").write_text(json.dumps(bad))
        line = one_line_error(run_cli("convert", "resnet10t", "--checkpoint", snap, "-o",
                                      tmp_path / "c.safetensors", *SMALL), "config.json")
        _no_secret(line)


# ============================================================================================
# --config goes through the bounded reader
# ============================================================================================
def _bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def _config_case(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    path = tmp_path / "run.yaml"
    if case == "fifo":  # opening it to read would wait for a writer forever
        os.mkfifo(path)
        return path, ["is not a regular file"]
    if case == "dev-zero":  # a link to an endless file
        os.symlink("/dev/zero", path)
        return path, ["is not a regular file"]
    if case == "directory":
        path.mkdir()
        return path, ["is a directory"]
    if case == "too-large":
        with open(path, "wb") as f:  # 100 MB, sparse: it is never read
            f.truncate(100 << 20)
        return path, ["104857600 bytes", "at most 1048576"]
    if case == "alias-bomb":
        path.write_text(_bomb())
        return path, ["run.yaml:", "expands to more than"]
    if case == "recursive-alias":
        path.write_text("epochs: &e [*e]\n")
        return path, ["refers to itself"]
    if case == "deep":
        path.write_text("epochs: " + "[" * 5000 + "]" * 5000 + "\n")
        return path, ["nested"]
    if case == "not-utf8":
        path.write_bytes(b"epochs: 2\nlr: caf\xe9\n")
        return path, ["run.yaml:2:", "not UTF-8"]
    raise AssertionError(case)


CONFIG_CASES = ["fifo", "dev-zero", "directory", "too-large", "alias-bomb", "recursive-alias",
                "deep", "not-utf8"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_hostile_config_files_are_one_line_in_bounded_time(run_cli, tmp_path, case):
    path, fragments = _config_case(tmp_path, case)
    out = tmp_path / "out"
    one_line_error(run_cli("finetune", "resnet10t", "--data", "synthetic", "--config", path,
                           "-o", out), *fragments)
    assert not out.exists()
    from sbn_surgery.train.config import read_config

    with pytest.raises(SbnSurgeryError):  # the Python API reads it the same way
        read_config(path)
