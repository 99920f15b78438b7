"""Hostile files, round 2: what a file holds never comes back in an error, --config is read by
the recipes' bounded reader, metadata cannot make a model larger than its tensors, and a tar
member cannot climb out of its archive. Each is one red line and exit 2, in bounded time."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import deep_through_aliases, one_line_error
from safetensors import safe_open
from safetensors.torch import save_file

import sbn_surgery as sbn
from sbn_surgery.errors import CheckpointError, DataError, RecipeError, SbnSurgeryError

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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(LEAKY))
def test_model_kwargs_keys_that_are_not_argument_names_are_not_echoed(run_cli, tmp_path, case):
    """In a --config file's model_kwargs (and on the command line): counted, not repeated (the
    keys came back twice, in the argument list and in timm's TypeError)."""
    path = tmp_path / "run.yaml"
    path.write_text("model_kwargs:\n" + "".join("  " + ln + "\n"
                                                for ln in LEAKY[case].splitlines()))
    out = tmp_path / "run"
    line = one_line_error(run_cli("finetune", "resnet10t", "--data", "synthetic", "--config",
                                  path, "-o", out, "--epochs", "1", *SMALL),
                          f"{LEAKY[case].count(chr(10))} argument name(s) that are not Python "
                          "names")
    _no_secret(line)
    key = {"credentials": "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI", "passwd-lines": "alice s3cret",
           "long-identifier": "s3cret" * 10}[case]
    for args in (("convert", "resnet10t", "-o", tmp_path / "c.safetensors"),
                 ("inspect", "resnet10t"), ("diagnose", "resnet10t")):
        line = one_line_error(run_cli(*args, "--model-kwargs", f"{key}=1", *SMALL),
                              "1 argument name(s) that are not Python names")
        _no_secret(line)
    path.write_text("model_kwargs:\n  bogus_arg: hunter2\n")  # a name timm refuses: named,
    line = one_line_error(run_cli("finetune", "resnet10t", "--data", "synthetic", "--config",
                                  path, "-o", out, "--epochs", "1", *SMALL),
                          "does not take these arguments (bogus_arg, num_classes)")
    _no_secret(line)  # its value not repeated


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
    if case == "deep-through-aliases":  # 720 levels once expanded, 16 at most where written
        path.write_text("model_kwargs:\n" + deep_through_aliases(12, 60, "  "))
        return path, ["run.yaml:", "nested more than 16 levels"]
    if case == "not-utf8":
        path.write_bytes(b"epochs: 2\nlr: caf\xe9\n")
        return path, ["run.yaml:2:", "not UTF-8"]
    raise AssertionError(case)


CONFIG_CASES = ["fifo", "dev-zero", "directory", "too-large", "alias-bomb", "recursive-alias",
                "deep", "deep-through-aliases", "not-utf8"]


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


# ============================================================================================
# metadata that would build a model larger than its tensors
# ============================================================================================
def _with_kwargs(src: Path, dst: Path, kwargs: dict) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["model_kwargs"] = json.dumps(kwargs)
    save_file(tensors, dst, metadata=meta)
    return dst


HUGE = "refused before allocating"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["export", "diagnose", "finetune"])
def test_widening_kwargs_are_refused_before_allocation_on_every_path(run_cli, tmp_path,
                                                                    resnet10t_file, command):
    """stem_width=2**40 (a stem of 10**25 elements: the meta-device build itself overflows)."""
    path = _with_kwargs(resnet10t_file, tmp_path / "huge.safetensors", {"stem_width": 2**40})
    args = {"export": ("export", path, "-o", tmp_path / "m.onnx"),
            "diagnose": ("diagnose", path, "--json"),
            "finetune": ("finetune", path, "--data", "synthetic", "-o", tmp_path / "run")}
    line = one_line_error(run_cli(*args[command]), "huge.safetensors", "does not fit its tensors",
                          HUGE)
    assert "MemoryError" not in line and not (tmp_path / "m.onnx").exists()
    if command == "finetune":  # nothing written but the run directory's lock
        assert {p.name for p in (tmp_path / "run").iterdir()} <= {".sbn-surgery.lock"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs", [{"AKIAIOSFODNN7EXAMPLE hunter2": 1},
                                    {"s3cret s3cret": {"nested": 1}}, {"x" * 100: 1}])
def test_metadata_kwargs_that_are_not_argument_names_are_not_echoed(run_cli, tmp_path,
                                                                    resnet10t_file, kwargs):
    path = _with_kwargs(resnet10t_file, tmp_path / "k.safetensors", kwargs)
    line = one_line_error(run_cli("diagnose", path, "--json"), "k.safetensors",
                          "'model_kwargs' is invalid", "not a Python argument name")
    _no_secret(line)
    assert "x" * 100 not in line


@pytest.mark.timeout(120)
def test_budget_bounds_the_real_build_when_the_meta_build_is_impossible(tmp_path, resnet10t_file,
                                                                        monkeypatch):
    """A model timm cannot build on the meta device skips the shape check; the real build is
    still refused at the first allocation past the budget (here a 150 M element stem conv)."""
    import torch

    import sbn_surgery.checkpoint as C

    path = _with_kwargs(resnet10t_file, tmp_path / "wide.safetensors", {"stem_width": 4096})
    built = []
    original = torch.empty

    def spy(*args, **kwargs):
        t = original(*args, **kwargs)
        built.append(t.numel() if t.device.type != "meta" else 0)
        return t

    monkeypatch.setattr(C, "_check_shapes", lambda *a, **k: None)  # as if meta were impossible
    with pytest.raises(CheckpointError, match=HUGE):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", spy)
            sbn.load_converted(path)
    held = sum(int(np.prod(s)) for s in C.safetensors_shapes(path)[1].values())
    assert sum(built) <= 2 * held + (1 << 24)  # nothing past the budget was allocated


@pytest.mark.timeout(120)
def test_budget_counts_what_models_really_allocate():
    """The budget's count of a real build is within 1 % of the model's parameters and buffers
    (so the 2x budget never refuses an honest file)."""
    import timm

    from sbn_surgery.alloc import AllocationBudget

    for name in ("resnet10t", "vit_tiny_patch16_224", "efficientnet_b0"):
        budget = AllocationBudget(10**12, RuntimeError)
        with budget:
            model = timm.create_model(name)
        held = sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))
        assert abs(budget.total - held) <= 0.01 * held, (name, budget.total, held)
    with pytest.raises(OverflowError):
        with AllocationBudget(1000, lambda n: OverflowError(n)):
            timm.create_model("resnet10t")


# ============================================================================================
# tar members that climb out of their archive
# ============================================================================================
def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _tar_root(root: Path, bad: str, inner: bool = False) -> Path:
    root.mkdir()
    png = _png()
    for split in ("train", "validation"):
        with tarfile.open(root / f"{split}.tar", "w") as tf:
            for c in ("a", "b"):
                for i in range(2):
                    _add(tf, f"{c}/{i}.png", png)
            if split == "train" and not inner:
                _add(tf, bad, png)
            elif split == "train":  # a tar inside the tar, under the bad name
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as child:
                    _add(child, "a/9.png", png)
                _add(tf, bad, buf.getvalue())
    return root


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad, inner", [("../x.png", False), ("/tmp/x.png", False),
                                        ("a/../../x.png", False), ("../c.tar", True)])
def test_tar_members_with_dotdot_or_absolute_names_are_one_line(run_cli, tmp_path, bad, inner):
    from sbn_surgery.data import open_source

    root = _tar_root(tmp_path / "d", bad, inner)
    with pytest.raises(DataError, match="tar member .* has a '..' component or an absolute path"):
        open_source(root, dataset="tar")
    out = tmp_path / "run"
    one_line_error(run_cli("finetune", "resnet10t", "--data", root, "--dataset", "tar", "-o",
                           out, *SMALL), "train.tar", repr(bad), "'..' component")
    assert not out.exists()


@pytest.mark.timeout(60)
def test_tar_with_relative_member_names_opens(tmp_path):
    from sbn_surgery.data import open_source

    root = _tar_root(tmp_path / "d", "b/..x.png")  # '..' inside a name is no component
    ds = open_source(root, dataset="tar")
    assert ds.classes == ["a", "b"] and len(ds.train) == 5


@pytest.mark.timeout(60)
def test_webdataset_keys_with_dotdot_are_one_line(tmp_path):
    from sbn_surgery.data import build_loaders, open_source

    root = tmp_path / "wds"
    root.mkdir()
    png = _png()
    for split, names in (("train", ["0", "../1"]), ("validation", ["v0", "v1"])):
        with tarfile.open(root / f"{split}-000000.tar", "w") as tf:
            for i, name in enumerate(names):
                _add(tf, f"{name}.png", png)
                _add(tf, f"{name}.cls", str(i).encode())
    ds = open_source(root, dataset="wds/x", train_split="train-000000.tar|2",
                     val_split="validation-000000.tar|2")
    cfg = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0,
           "mean": (0.5,) * 3, "std": (0.5,) * 3}
    train, _, _ = build_loaders(ds, cfg, 2)
    with pytest.raises(SbnSurgeryError, match=r"tar member '\.\./1' has a '\.\.' component"):
        list(train.iter_epoch(0))
