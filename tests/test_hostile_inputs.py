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
from conftest import deep_through_aliases, one_line_error

import sbn_surgery as sbn
from sbn_surgery.errors import RecipeError, SurgeryError

CLI = str(Path(sys.executable).with_name("sbn-surgery"))
SMALL = ["--input-size", "3", "32", "32"]


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
    "nesting-through-aliases": (("name: t\n" + deep_through_aliases(28) + RULE).encode(),
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
#: What the same rules do when every match finishes inside the limit (a fast machine): the rule
#: then also matches global_pool, whose output is not a feature map.
NOT_NCHW = ("rule 1 matched global_pool", "no 2-D feature map")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["paths", "exclude", "models"])
@pytest.mark.slow
def test_catastrophic_regex_cannot_hang_a_command(tmp_path, where):
    """How long a match runs depends on the machine (resnet10t's paths are at most 19
    characters: about 0.3 s each on a slow machine, milliseconds on a fast one), so the command
    asserts only what holds on any machine: it ends within its bound, with exit 2 and one line,
    either the pattern that ran past the limit or what the finished match selected."""
    path = tmp_path / "c.yaml"
    if where == "models":
        path.write_text(f"name: c\nmodels: ['{CATASTROPHIC}']\n{RULE}")
        recipe = sbn.load_recipe(path)
        # 40 characters, not ending in a digit: about 2**40 steps, past the limit on any machine
        with pytest.raises(RecipeError, match="ran past"):
            recipe.fits_model("resnet10t_" + "x" * 30)
        return
    rule = f"paths: ['{CATASTROPHIC}', global_pool]" if where == "paths" else \
        f"paths: ['*']\n    exclude: ['{CATASTROPHIC}']"  # tried on every module path
    path.write_text(f"name: c\nrules:\n  - {rule}\n")
    args = ("inspect", "resnet10t", "--recipe", path, *SMALL)
    line = one_line_error(run_bounded(*args, timeout=120))
    ran_past = CATASTROPHIC in line and "ran past" in line
    assert ran_past or all(f in line for f in NOT_NCHW), line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["paths", "exclude"])
def test_catastrophic_regex_rules_select_global_pool_when_every_match_finishes(
        run_cli, tmp_path, monkeypatch, where):
    """The other outcome of the test above, made certain by a limit no match reaches: what a
    fast machine sees (the longest of resnet10t's paths takes about 0.3 s on a slow one)."""
    import sbn_surgery.patterns as patterns

    monkeypatch.setattr(patterns, "MATCH_TIMEOUT_S", 600.0)
    rule = f"paths: ['{CATASTROPHIC}', global_pool]" if where == "paths" else \
        f"paths: ['*']\n    exclude: ['{CATASTROPHIC}']"
    path = tmp_path / "c.yaml"
    path.write_text(f"name: c\nrules:\n  - {rule}\n")
    one_line_error(run_cli("inspect", "resnet10t", "--recipe", path, *SMALL), *NOT_NCHW)


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
    with pytest.raises(RecipeError, match="recipe 'densenet' is for models.*not resnet10t"):
        sbn.apply_recipe(timm.create_model("resnet10t"), "densenet", input_size=(3, 32, 32))
    plan = sbn.apply_recipe(timm.create_model("resnet10t"), path, input_size=(3, 32, 32),
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


# ============================================================================================
# images and folders
# ============================================================================================
def _ramp(width: int = 256, height: int = 16):
    import numpy as np
    return np.tile(np.arange(width), (height, 1))


def _mode_images():
    """Mode -> (file name, a 256-level horizontal gradient in that mode)."""
    import numpy as np
    from PIL import Image

    ramp = _ramp()
    pal = Image.fromarray(ramp.astype(np.uint8), "L").convert("P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.info["transparency"] = 0
    return {
        "I;16": ("a.png", Image.fromarray((ramp * 257).astype(np.uint16))),
        "I;16B": ("a.tif", Image.frombytes("I;16B", (256, 16), (ramp * 257).astype(">u2").tobytes())),
        "I": ("a.tif", Image.fromarray((ramp * 257).astype(np.int32))),
        "F": ("a.tif", Image.fromarray((ramp / 255).astype(np.float32))),
        "LA": ("a.png", Image.fromarray(np.stack([ramp, ramp * 0 + 99], -1).astype(np.uint8), "LA")),
        "P+transparency": ("a.png", pal),
        "CMYK": ("a.tif", Image.fromarray(np.stack([ramp * 0] * 3 + [255 - ramp], -1).astype(np.uint8),
                                          "CMYK")),
    }


def _folder(root: Path, images: dict) -> Path:
    """root/train/<class>/<name> and the same under val/, from {class/name: PIL image}."""
    for split in ("train", "val"):
        for rel, img in images.items():
            (root / split / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / split / rel)
    return root


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", sorted(_mode_images()))
@pytest.mark.parametrize("channels", [1, 3])
def test_deep_and_odd_image_modes_keep_their_levels_through_the_transform(tmp_path, mode, channels):
    from PIL import Image

    from sbn_surgery.data import build_loaders

    name, img = _mode_images()[mode]
    _folder(tmp_path, {f"a/{name}": img, f"b/{name}": img})
    assert Image.open(tmp_path / "train" / "a" / name).mode == img.mode
    cfg = {"input_size": (channels, 16, 256), "interpolation": "bilinear", "crop_pct": 1.0,
           "mean": (0.5,) * channels, "std": (0.5,) * channels}
    _, val, _ = build_loaders(str(tmp_path), cfg, 2)
    x, _ = next(val.iter_epoch(0))
    assert x.shape == (2, channels, 16, 256)
    row = x[0, 0, 8]
    # 256 levels in, (nearly) 256 out, over the full range [-1, 1] (PIL's convert gave 2)
    assert len(set(row.tolist())) >= 250
    assert float(row.min()) == pytest.approx(-1, abs=0.02) and float(row.max()) == pytest.approx(1, abs=0.02)
    assert bool((row[1:] >= row[:-1] - 1e-6).all())  # still a ramp, not folded or inverted


def test_one_bit_images_span_the_full_range(tmp_path):
    from PIL import Image

    from sbn_surgery.data.images import load_image

    Image.fromarray(_ramp() >= 128).save(tmp_path / "b.png")
    import numpy as np
    assert sorted(np.unique(np.asarray(load_image(str(tmp_path / "b.png"), 3)))) == [0, 255]


def _eight_images(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.full((8, 8, 3), 120, np.uint8))
    return _folder(root, {f"{c}/{i}.png": img for c in "ab" for i in range(4)})


@pytest.mark.timeout(60)
def test_symlink_loops_are_followed_once(tmp_path):
    from sbn_surgery.data import open_source

    root = _eight_images(tmp_path / "d")
    os.symlink("..", root / "train" / "a" / "loop")  # a -> train -> a -> ...
    os.symlink(root / "train", root / "train" / "b" / "up")  # a second loop, through b
    os.symlink(root / "train" / "a" / "0.png", root / "train" / "b" / "same.png")  # a file twice
    outside = _eight_images(tmp_path / "elsewhere")
    os.symlink(outside / "train" / "a", root / "train" / "a" / "more")  # a real folder elsewhere
    ds = open_source(root)
    got = sorted((os.path.relpath(os.path.realpath(p), tmp_path), t) for p, t in ds.train.samples)
    # each real image once, in its own class: the loops and the second link add nothing, the
    # link to a folder elsewhere adds its 4 images
    want = sorted([(f"d/train/{c}/{i}.png", "ab".index(c)) for c in "ab" for i in range(4)]
                  + [(f"elsewhere/train/a/{i}.png", 0) for i in range(4)])
    assert got == want


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_symlink_loop_scan_is_bounded_from_the_cli(tmp_path):
    root = _eight_images(tmp_path / "d")
    for split in ("train", "val"):
        os.symlink("..", root / split / "a" / "loop1")
        os.symlink("..", root / split / "b" / "loop2")
    before = digests(root)
    res = run_bounded("diagnose", "resnet10t", "--data", root, "--batch-size", "4", "--json",
                      *SMALL, timeout=100)
    assert res.returncode == 0, res.stderr
    assert digests(root) == before


def _png_header_lie(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose IHDR then declares ``width`` x ``height`` (CRC fixed)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _bad_folder(root: Path, case: str) -> tuple[Path, list[str]]:
    import numpy as np
    from PIL import Image

    good = Image.fromarray(np.full((8, 8, 3), 120, np.uint8))
    root = _folder(root, {"a/0.png": good, "b/0.png": good})
    bad = root / "train" / "a" / "1.png"
    if case == "bomb":
        _png_header_lie(bad, 20000, 20000)  # 400 MP declared in 70 bytes
        return root, ["1.png", "decompression bomb", "400000000 pixels"]
    if case == "large":  # past PIL's warning (89 MP), short of its bomb error (179 MP)
        _png_header_lie(bad, 10000, 10000)
        return root, ["1.png", "10000x10000 (100 MP), more than 89 MP"]
    if case == "wide":
        _png_header_lie(bad, 100000, 1)
        return root, ["1.png", "100000x1"]
    if case == "truncated-jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            root / "train" / "a" / "1.jpg", quality=90)
        data = (root / "train" / "a" / "1.jpg").read_bytes()
        (root / "train" / "a" / "1.jpg").write_bytes(data[: len(data) // 2])
        return root, ["1.jpg", "truncated"]
    if case == "not-an-image":
        bad.write_bytes(b"\x00" * 100)
        return root, ["cannot read image", "1.png"]
    if case == "only-unreadable":
        for p in (root / "train").rglob("*.png"):
            p.write_text("not a png")
        return root, ["cannot read image"]
    if case == "no-images":
        for p in root.rglob("*.png"):
            p.unlink()
        return root, ["no images"]
    if case == "many-empty-classes":
        for i in range(3000):
            (root / "train" / f"class{i:05d}").mkdir()
            (root / "val" / f"class{i:05d}").mkdir()
        return root, ["3000 class folder(s)", "hold no images", "class00000"]
    raise AssertionError(case)


BAD_FOLDERS = ["bomb", "large", "wide", "truncated-jpeg", "not-an-image",
               "only-unreadable", "no-images", "many-empty-classes"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_image_folders_are_one_line(run_cli, tmp_path, case):
    root, fragments = _bad_folder(tmp_path / "d", case)
    before = digests(root)
    res = run_cli("diagnose", "resnet10t", "--data", root, "--batch-size", "3", *SMALL)  # all
    one_line_error(res, *fragments)
    assert digests(root) == before


@pytest.mark.timeout(120)
def test_decompression_bomb_from_a_loader_worker_is_one_line(tmp_path):
    """In a DataLoader worker process too: the message names the file, without the worker's
    traceback."""
    from sbn_surgery.data import build_loaders
    from sbn_surgery.errors import DataError

    root, _ = _bad_folder(tmp_path / "d", "bomb")
    for name in ("a/0.png", "b/0.png"):  # every training image, whatever the batches hold
        _png_header_lie(root / "train" / name, 20000, 20000)
    cfg = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0,
           "mean": (0.5,) * 3, "std": (0.5,) * 3}
    train, _, _ = build_loaders(str(root), cfg, 2, workers=1)
    with pytest.raises(DataError) as info:
        list(train.iter_epoch(0))
    text = str(info.value)
    assert ".png is a decompression bomb" in text and "400000000 pixels" in text and "Traceback" not in text and "\n" not in text


def test_tiny_images_load(tmp_path):
    """1x1 images are images: they are resized, not refused."""
    import numpy as np
    from PIL import Image

    from sbn_surgery.data import build_loaders

    one = Image.fromarray(np.full((1, 1, 3), 200, np.uint8))
    root = _folder(tmp_path, {"a/0.png": one, "b/0.png": one})
    cfg = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0,
           "mean": (0.0,) * 3, "std": (1.0,) * 3}
    _, val, _ = build_loaders(str(root), cfg, 2)
    x, _ = next(val.iter_epoch(0))
    assert x.shape == (2, 3, 8, 8) and float(x.min()) == pytest.approx(200 / 255, abs=1e-3)


# ============================================================================================
# fine-tuning options and non-finite training
# ============================================================================================
BAD_OPTIONS = {
    "--lr inf": (["--lr", "inf"], "--lr must be a finite number"),
    "--lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "--lr 0": (["--lr", "0"], "--lr must be > 0"),
    "--lr -1": (["--lr", "-1"], "--lr must be > 0"),
    "--weight-decay nan": (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    "--weight-decay -1": (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    "--warmup-epochs nan": (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite"),
    "--warmup-epochs -1": (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    "--warmup-epochs 11": (["--warmup-epochs", "11"], "--warmup-epochs must be in [0, --epochs=10]"),
    "--label-smoothing 1": (["--label-smoothing", "1"], "--smoothing must be >= 0 and < 1"),
    "--smoothing nan": (["--smoothing", "nan"], "--smoothing must be a finite"),
    "--sched foo": (["--sched", "foo"], "--sched 'foo' is not one of cosine, step"),
    "--opt foo": (["--opt", "foo"], "--opt 'foo' is not a timm optimizer"),
    "--opt-betas x": (["--opt-betas", "x,1"], "--opt-betas expects comma-separated numbers"),
    "--opt-betas 1 value": (["--opt-betas", "0.9"], "--opt-betas expects 2 or 3 numbers"),
    "--mixup -1": (["--mixup", "-1"], "--mixup must be >= 0"),
    "--model-ema-decay 1": (["--model-ema-decay", "1"], "--model-ema-decay must be >= 0 and < 1"),
    "--grad-accum-steps 0": (["--grad-accum-steps", "0"], "--grad-accum-steps must be >= 1"),
    "--clip-grad nan": (["--clip-grad", "nan"], "--clip-grad must be a finite number"),
    "--clip-mode foo": (["--clip-mode", "foo"], "--clip-mode 'foo' is not one of norm"),
    "--best-by ema alone": (["--best-by", "ema"], "--best-by ema needs --model-ema"),
    "--train-split alone": (["--train-split", "x"], "give --dataset too"),
    "--aa bad": (["--aa", "foo"], "--aa 'foo' is not an augmentation timm knows"),
    "--dataset bad": (["--dataset", "xyz"], "--dataset 'xyz' is not one this tool reads"),
    "--config missing": (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml cannot be read"),
    "--input-size 3 0 0": (["--input-size", "3", "0", "0"], "--input-size expects C H W"),
    "--input-size 3 100000 100000": (["--input-size", "3", "100000", "100000"], "<= 4096"),
    "--input-size 1000 32 32": (["--input-size", "1000", "32", "32"], "1 <= C <= 64"),
    "--seed -1": (["--seed", "-1"], "--seed must be >= 0"),
    "--seed 2**64": (["--seed", str(2**64)], "--seed must be >= 0 and <="),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_finetune_options_are_one_line_before_any_work(run_cli, tmp_path, case):
    args, fragment = BAD_OPTIONS[case]
    out = tmp_path / "run"
    res = run_cli("finetune", "resnet10t", "--data", "synthetic", "-o", out, *args)
    one_line_error(res, fragment)
    assert not out.exists()  # refused before the output folder was made


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs,fragment", [
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(batch_size=1), "--batch-size must be >= 2"),
    (dict(subset=1), "--subset must be >= 2"),
    (dict(num_classes=0), "--num-classes must be >= 1"),
    (dict(lr="0.1"), "--lr must be a number"),
    (dict(seed=True), "--seed must be an integer"),
    (dict(epochs=2.5), "--epochs must be an integer"),
    (dict(workers=-1), "--workers must be >= 0 and <= 256"),
    (dict(opt="adan", opt_betas=[0.9, 0.99]), "refused its arguments"),
])
def test_bad_finetune_arguments_from_python(tmp_path, kwargs, fragment):
    with pytest.raises(sbn.SbnSurgeryError) as info:
        sbn.finetune("resnet10t", "synthetic", output=tmp_path / "run", **kwargs)
    assert fragment in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
def test_finetune_refuses_a_recipe_for_other_models_unless_forced(tmp_path):
    with pytest.raises(RecipeError, match="recipe 'densenet' is for models.*not resnet10t"):
        sbn.finetune("resnet10t", "synthetic", recipe="densenet", output=tmp_path / "run",
                     epochs=1, subset=16, batch_size=8, input_size=(3, 32, 32))
    assert not (tmp_path / "run" / "state.pt").exists()


def _nan_after(monkeypatch, calls: int) -> None:
    """The training loss is NaN from its ``calls``-th computation on (validation is untouched)."""
    import torch

    original = torch.nn.CrossEntropyLoss.forward
    count = [0]

    def forward(self, logits, target):
        loss = original(self, logits, target)
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] >= calls:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_files(run_cli, tmp_path,
                                                                     monkeypatch):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _nan_after(monkeypatch, 3)  # 2 steps an epoch: epoch 2, step 1
    res = run_cli("finetune", "resnet10t", "--recipe", "resnet", "--data", "synthetic", "-o", out,
                  "--epochs", "3", "--subset", "32", "--batch-size", "16", *SMALL, "--workers", "0")
    said = res.stderr.splitlines()  # the run said which images calibrated SBN, then failed
    assert [ln for ln in said if ln.startswith("calibration:")] == [said[0]]
    res.stderr = "\n".join(said[1:])
    one_line_error(res, "training diverged in epoch 2", "loss is nan at step 1 of 2",
                   "keeps the last finished epoch (epoch 1)", "--lr")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 1  # the state of the last finished epoch, resumable
    last, best = load_file(out / "last.safetensors"), load_file(out / "best.safetensors")
    assert last.keys() == best.keys()
    for k in last:  # nothing of epoch 2 was written: both are epoch 1's finite weights
        assert torch.isfinite(last[k].float()).all() and torch.equal(last[k], best[k]), k
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(metrics) == 1


@pytest.mark.timeout(300)
def test_non_finite_first_epoch_writes_no_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_after(monkeypatch, 1)
    with pytest.raises(sbn.SbnSurgeryError, match=r"epoch 1: the training loss is nan at step 1 "
                                                   r"of 2.*\(none yet\)"):
        sbn.finetune("resnet10t", "synthetic", recipe="resnet", output=out, epochs=2, subset=32,
                     batch_size=16, input_size=(3, 32, 32))
    assert not (out / "best.safetensors").exists() and not (out / "last.safetensors").exists()


# ============================================================================================
# ONNX files (bench, parity)
# ============================================================================================
def _onnx_file(path: Path, inputs: list[tuple[str, int, list]], body: str = "relu") -> Path:
    """A tiny ONNX model: ``inputs`` as (name, element type, dims); the output is Relu of the
    first (or a constant when there is none)."""
    import onnx
    from onnx import TensorProto, helper

    vin = [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs]
    if inputs:
        nodes = [helper.make_node("Relu", [inputs[0][0]], ["y"])]
        out = helper.make_tensor_value_info("y", inputs[0][1], None)
    else:
        nodes = [helper.make_node("Constant", [], ["y"], value=helper.make_tensor(
            "c", TensorProto.FLOAT, [1, 10], [0.0] * 10))]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    model = helper.make_model(helper.make_graph(nodes, "g", vin, [out]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(path))
    return path


def _bad_onnx(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    from onnx import TensorProto

    f = TensorProto.FLOAT
    path = tmp_path / f"{case}.onnx"
    if case == "not-onnx":
        path.write_text("name: this is a YAML file\n" * 50)
        return path, ["not-onnx.onnx"]
    if case == "empty":
        path.write_bytes(b"")
        return path, ["empty.onnx", "expected one image input", "none"]
    if case == "truncated":
        data = _onnx_file(path, [("x", f, [1, 3, 32, 32])]).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, ["truncated.onnx"]
    if case == "no-inputs":
        return _onnx_file(path, []), ["has 0 (none)"]
    if case == "two-inputs":
        return _onnx_file(path, [("x", f, [1, 3, 32, 32]), ("z", f, [1])]), ["has 2 (x, z)"]
    if case == "int64-input":
        return _onnx_file(path, [("x", TensorProto.INT64, [1, 3, 32, 32])]), ["is INT64", "FLOAT"]
    if case == "uint8-input":
        return _onnx_file(path, [("x", TensorProto.UINT8, [1, 3, 32, 32])]), ["is UINT8"]
    if case == "zero-dim":
        return _onnx_file(path, [("x", f, [1, 3, 0, 32])]), ["declares a dimension of 0"]
    if case == "negative-dim":
        return _onnx_file(path, [("x", f, [1, 3, -5, 32])]), ["declares a dimension of -5"]
    if case == "huge-dim":
        return _onnx_file(path, [("x", f, [1, 3, 100000, 100000])]), ["30000000000 elements"]
    if case == "rank-2":
        return _onnx_file(path, [("x", f, [1, 3])]), ["has 2 dims"]
    raise AssertionError(case)


BAD_ONNX = ["not-onnx", "empty", "truncated", "no-inputs", "two-inputs", "int64-input",
            "uint8-input", "zero-dim", "negative-dim", "huge-dim", "rank-2"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD_ONNX)
def test_bench_on_odd_onnx_files_is_one_line(run_cli, tmp_path, case):
    path, fragments = _bad_onnx(tmp_path, case)
    before = digests(tmp_path)
    one_line_error(run_cli("bench", path, "--repeats", "1"), *fragments)
    assert digests(tmp_path) == before


@pytest.mark.timeout(60)
def test_bench_refuses_a_huge_input_size_before_allocating(run_cli, tmp_path):
    from onnx import TensorProto

    path = _onnx_file(tmp_path / "sym.onnx", [("x", TensorProto.FLOAT, ["n", 3, "h", "w"])])
    one_line_error(run_cli("bench", path, "--input-size", "3", "60000", "60000"),
                   "10800000000 elements")
    one_line_error(run_cli("bench", path, "--input-size", "3", "0", "8"), "dimension below 1")
    res = run_cli("bench", path, "--input-size", "3", "8", "8", "--repeats", "2", "--json")
    assert res.code == 0, res.stderr  # a plain float image file runs


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    model, _ = sbn.convert("resnet10t", "resnet", num_classes=10, input_size=(3, 32, 32),
                           init="standard")
    path = tmp_path_factory.mktemp("ckpt") / "r10.safetensors"
    sbn.save_converted(model, path)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["not-onnx", "empty", "two-inputs", "int64-input", "zero-dim",
                                  "huge-dim"])
def test_parity_on_odd_onnx_files_is_one_line(run_cli, tmp_path, small_checkpoint, case):
    path, fragments = _bad_onnx(tmp_path, case)
    before = digests(tmp_path)
    one_line_error(run_cli("parity", path, small_checkpoint), *fragments)
    assert digests(tmp_path) == before


# ============================================================================================
# export: a failing export never replaces a good file
# ============================================================================================
@pytest.mark.timeout(60)
@pytest.mark.parametrize("rtol", ["-1", "0", "nan", "inf", "-inf"])
def test_export_refuses_bad_rtol_before_writing(run_cli, tmp_path, small_checkpoint, rtol):
    good = tmp_path / "m.onnx"
    good.write_bytes(b"a good file from before")
    one_line_error(run_cli("export", small_checkpoint, "-o", good, f"--rtol={rtol}"),
                   "--rtol must be a finite number > 0")
    assert good.read_bytes() == b"a good file from before"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    with pytest.raises(sbn.SbnSurgeryError, match="--rtol must be a finite number > 0"):
        sbn_parity().check_parity(good, None, rtol=float(rtol))


def sbn_parity():
    import sbn_surgery.parity as parity
    return parity


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_failing_export_keeps_the_good_file_and_the_failing_one_beside_it(run_cli, tmp_path,
                                                                         small_checkpoint):
    import onnx

    good = tmp_path / "m.onnx"
    res = run_cli("export", small_checkpoint, "-o", good)
    assert res.code == 0, res.stderr
    before = good.read_bytes()
    res = run_cli("export", small_checkpoint, "-o", good, "--mode", "dft", "--rtol", "1e-12")
    failed = tmp_path / "m.parity-failed.onnx"
    line = one_line_error(res, "parity failed", str(failed), f"{good} was not written")
    assert good.read_bytes() == before  # the good file is untouched
    assert onnx.load(str(failed)).metadata_props  # the failing file is there, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.parity-failed.onnx"]
    assert "Traceback" not in line
