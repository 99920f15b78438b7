"""Serving an exported file: predict, validate and quantize on small ONNX files built here (a
colour classifier whose right answer is known without running it), bench side by side, the bad
inputs of each command, and predict with torch and timm unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

from sbn_surgery.errors import ServingError

COLOURS = {"red": (230, 20, 30), "green": (25, 220, 40), "blue": (20, 35, 240)}
CLASSES = sorted(COLOURS)  # as ImageFolder (and so fine-tuning) orders class folders
#: The output index of each input channel (R, G, B): blue first, red last.
CHANNEL_OF = [CLASSES.index(c) for c in ("red", "green", "blue")]
CFG = {"input_size": [3, 24, 24], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
       "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
GAIN = 2.0  # the classifier's logits: GAIN x the normalized mean of each channel


def colour_model(path: Path, *, meta: dict | None = None, batch="n", in_type=None,
                 classes=CLASSES, external: str | None = None) -> Path:
    """An ONNX classifier of pure colours: logits = GAIN * mean over the image of each
    normalized channel, in the order of CLASSES (a 1x1 convolution, global average pooling, a
    linear layer that permutes the channels); ``external``: its weights kept in that file
    beside it (ONNX external data)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sbn_surgery.onnx_io import set_onnx_metadata

    eye = np.eye(3, dtype=np.float32)
    inits = [numpy_helper.from_array((GAIN * eye).reshape(3, 3, 1, 1), "w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b"),
             numpy_helper.from_array(eye[:, CHANNEL_OF], "fc"), numpy_helper.from_array(np.zeros(3, np.float32), "fb")]
    x_type = TensorProto.FLOAT if in_type is None else in_type
    nodes = [] if in_type is None else [helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT)]
    x = "input" if in_type is None else "xf"
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["c"], name="conv"),
              helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], name="fc")]
    graph = helper.make_graph(
        nodes, "colours", [helper.make_tensor_value_info("input", x_type, [batch, 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is None:
        meta = {"data_config": CFG, "classes": classes, "classes_source": "test colours"}
    set_onnx_metadata(model, meta)
    if external is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external, size_threshold=0)
    return path


def expected_probs(rgb) -> np.ndarray:
    """The colour model's probabilities for a flat image of colour ``rgb``, by hand."""
    x = (np.asarray(rgb, np.float64) / 255.0 - 0.5) / 0.25
    z = np.empty(3)
    z[CHANNEL_OF] = GAIN * x
    e = np.exp(z - z.max())
    return e / e.sum()


def write_image(path: Path, rgb, size=(40, 30), mode="RGB") -> Path:
    img = Image.new("RGB", size, tuple(rgb))
    (img.quantize(4) if mode == "P" else img.convert(mode)).save(path)  # a flat image stays flat
    return path


@pytest.fixture
def model_file(tmp_path):
    return colour_model(tmp_path / "colours.onnx")


def digests(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
def test_predict_names_the_right_class_with_the_right_probability(model_file, tmp_path):
    from sbn_surgery.serving import predict

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    paths = [write_image(folder / "a-red.png", COLOURS["red"]),
             write_image(folder / "sub" / "b-blue.jpg", COLOURS["blue"], size=(31, 77)),
             write_image(folder / "c-green.png", COLOURS["green"], mode="P")]
    result = predict(model_file, [folder, paths[0]], k=2, batch_size=2)
    got = {Path(p.image).name: p for p in result.predictions}
    assert [Path(p.image).name for p in result.predictions] == ["a-red.png", "c-green.png",
                                                                 "b-blue.jpg", "a-red.png"]
    for name, colour in (("a-red.png", "red"), ("b-blue.jpg", "blue"), ("c-green.png", "green")):
        p = got[name]
        want = expected_probs(COLOURS[colour])
        assert p.classes[0] == colour and p.indices[0] == CLASSES.index(colour)
        # JPEG shifts the colour a little: the probabilities of the PNGs are exact
        tol = 2e-2 if name.endswith(".jpg") else 1e-5
        np.testing.assert_allclose(p.probs, np.sort(want)[::-1][:2], atol=tol)


def test_a_fixed_batch_file_runs_any_number_of_images(tmp_path):
    from sbn_surgery.serving import predict

    model = colour_model(tmp_path / "b2.onnx", batch=2)
    images = [write_image(tmp_path / f"{i}.png", COLOURS[c]) for i, c in
              enumerate(["red", "blue", "green"])]
    result = predict(model, images, k=1, batch_size=16)
    assert [p.classes[0] for p in result.predictions] == ["red", "blue", "green"]


def test_predict_cli_table_and_json(run_cli, model_file, tmp_path):
    image = write_image(tmp_path / "x.png", COLOURS["green"])
    res = run_cli("predict", model_file, image, "--top-k", "3", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["model"]["data_config"] == CFG and data["model"]["num_classes"] == 3
    assert data["model"]["classes_source"] == "test colours"
    top = data["predictions"][0]["top_k"]
    assert [t["class"] for t in top][0] == "green" and len(top) == 3
    assert sum(t["prob"] for t in top) == pytest.approx(1.0)
    res = run_cli("predict", model_file, image, "-k", "1")
    assert res.code == 0 and "green" in res.stdout and "blue" not in res.stdout


def test_paths_that_look_like_markup_print_as_they_are(run_cli, tmp_path, monkeypatch):
    """A file name is text, not rich markup: '[/red]' in a path is printed, not parsed (an
    unmatched closing tag made rich raise, a traceback)."""
    monkeypatch.setenv("COLUMNS", "400")  # no path folded over two lines
    (tmp_path / "x[").mkdir()
    model = colour_model(tmp_path / "x[" / "red].onnx")  # the path holds 'x[/red]'
    image = write_image(tmp_path / "x[" / "[bold]g.png", COLOURS["green"])
    res = run_cli("predict", model, image)
    assert res.code == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "x[/red].onnx" in text and "[bold]g.png" in text
    res = run_cli("bench", model, model, "--input-size", "3", "24", "24", "--repeats", "1")
    assert res.code == 0, res.stderr
    assert "x[/red].onnx" in res.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_a_data_config_that_asks_for_a_giant_resize_is_refused_before_it(run_cli, tmp_path,
                                                                          mode):
    """Within every bound of its own (input 4096, crop_pct 0.05), a file's preprocessing may ask
    to resize an image to 81920 pixels a side (20 GB); refused before the resize allocates."""
    cfg = {**CFG, "input_size": [3, 4096, 4096], "crop_pct": 0.05, "crop_mode": mode}
    model = colour_model(tmp_path / "giant.onnx",
                         meta={"data_config": cfg, "classes": CLASSES})
    image = write_image(tmp_path / "small.png", COLOURS["red"])
    one_line_error(run_cli("predict", model, image), "giant.onnx", "crop_pct 0.05",
                   "resizes a 40x30 image to", "more than 89478485 pixels")


def _classes_known_at_run_time(path: Path, classes: list[str]) -> Path:
    """3 logits (each channel's mean) through a TopK whose k is computed from the input, so
    neither the file nor onnxruntime's shape inference knows the class count: only the logits
    can be checked against the metadata's class names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sbn_surgery.onnx_io import set_onnx_metadata

    inits = [numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
             numpy_helper.from_array(np.full(1, 3.0, np.float32), "three")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("ReduceMax", ["f"], ["m"], keepdims=0),  # (N,) from the data
             helper.make_node("ReduceMax", ["m"], ["m1"], keepdims=1),  # (1,)
             helper.make_node("Mul", ["m1", "zero"], ["z"]),
             helper.make_node("Add", ["z", "three"], ["k3"]),  # 3, unknown to inference
             helper.make_node("Cast", ["k3"], ["k"], to=TensorProto.INT64),
             helper.make_node("TopK", ["f", "k"], ["logits", "idx"], axis=1)]
    graph = helper.make_graph(
        nodes, "classes-at-run-time",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "k"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_onnx_metadata(model, {"data_config": CFG, "classes": classes})
    onnx.save(model, str(path))
    return path


def _no_metadata(tmp_path):
    return colour_model(tmp_path / "plain.onnx", meta={})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["not-an-image", "missing", "empty-folder", "no-metadata",
                                  "int-input", "not-onnx", "bad-classes", "symbolic-classes"])
def test_predict_bad_inputs_are_one_line(run_cli, tmp_path, model_file, case):
    from onnx import TensorProto

    image = write_image(tmp_path / "ok.png", COLOURS["red"])
    model, images, fragments = model_file, [image], []
    if case == "not-an-image":
        images = [tmp_path / "fake.png"]
        images[0].write_bytes(b"GIF89a but not really")
        fragments = ["fake.png"]
    elif case == "missing":
        images, fragments = [tmp_path / "nope.png"], ["does not exist"]
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        images, fragments = [tmp_path / "empty"], ["no image files"]
    elif case == "no-metadata":
        model, fragments = _no_metadata(tmp_path), ["no preprocessing metadata", "export it again"]
    elif case == "int-input":
        model = colour_model(tmp_path / "int.onnx", in_type=TensorProto.INT64)
        fragments = ["float32 image input", "tensor(int64)"]
    elif case == "not-onnx":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"\x00garbage" * 10)
        fragments = ["cannot load", "model.onnx"]
    elif case == "bad-classes":
        model = colour_model(tmp_path / "bc.onnx", classes=["a", "b"])
        fragments = ["2 class names for 3 model outputs"]
    elif case == "symbolic-classes":  # the class axis is known only when it runs
        model = _classes_known_at_run_time(tmp_path / "sc.onnx", ["a"])
        fragments = ["sc.onnx", "logits of shape (1, 3) for 1 class names"]
    one_line_error(run_cli("predict", model, *images), *fragments)


#: What README's serving-box install names (besides this package, installed with --no-deps).
SERVING_PACKAGES = ("onnxruntime", "numpy", "pillow", "typer", "rich", "pydantic")


def _installed_closure(names) -> set[str]:
    """The top-level modules of ``names`` and of every distribution they require (installed
    versions, extras left out): what ``pip install NAMES`` puts on a serving box."""
    import re
    from importlib import metadata

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or []
                 if "extra ==" not in r.replace("extra==", "extra ==")]
    return {mod for mod, dists in metadata.packages_distributions().items()
            if any(d.lower().replace("_", "-") in seen for d in dists)}


def test_readme_names_the_serving_box_packages():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"pip install {' '.join(SERVING_PACKAGES)}" in readme


def test_predict_and_validate_run_on_a_serving_box(model_file, tmp_path):
    """A serving box has only SERVING_PACKAGES (and what they require): a meta-path blocker
    makes importing any other installed package fail, torch, timm and onnx included."""
    allowed = _installed_closure(SERVING_PACKAGES) | {"sbn_surgery", "sbn_surgery_cli"}
    assert not allowed & {"torch", "timm", "torchvision", "onnx", "yaml", "sklearn"}
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"ALLOWED = {sorted(allowed)!r}\n"
        "LOADED = set(sys.modules)\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top in sys.stdlib_module_names or top in ALLOWED or top in LOADED \\\n"
        "                or top.startswith('_'):\n"
        "            return None\n"
        "        raise ImportError(f'{name} is not installed on this serving box')\n"
        "sys.meta_path.insert(0, _Block())\n")
    image = write_image(tmp_path / "b.png", COLOURS["blue"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(blocker)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for probe in ("torch", "timm", "onnx"):
        res = subprocess.run([sys.executable, "-c", f"import {probe}"], env=env,
                             capture_output=True, text=True)
        assert res.returncode != 0 and "serving box" in res.stderr  # the blocker works
    res = subprocess.run([sys.executable, "-m", "sbn_surgery_cli", "predict", str(model_file),
                          str(image), "--json"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["predictions"][0]["top_k"][0]["class"] == "blue"
    folder = _labelled_folder(tmp_path / "data")
    res = subprocess.run([sys.executable, "-m", "sbn_surgery_cli", "validate", str(model_file),
                          "--data", str(folder), "--json"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["top1"] == pytest.approx(5 / 6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["parent", "absolute", "link-out"])
def test_serving_refuses_external_data_outside_before_onnxruntime(run_cli, tmp_path, monkeypatch,
                                                                  case):
    """predict, validate and quantize open a file in onnxruntime only after checking where its
    tensors' data lives (as parity and export do), without the onnx package."""
    import onnxruntime
    from test_hostile_external_data import _set_location

    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"\0" * 64)
    (tmp_path / "model").mkdir()
    model = colour_model(tmp_path / "model" / "m.onnx", external="w.bin")
    if case == "link-out":
        (tmp_path / "model" / "w.bin").unlink()
        os.symlink(secret, tmp_path / "model" / "w.bin")
        why = "a link that leads outside the model's folder"
    else:
        _set_location(model, "../outside/secret.bin" if case == "parent" else str(secret))
        why = "a '..' component" if case == "parent" else "an absolute path"

    def reached(*args, **kwargs):
        raise AssertionError("a refused file reached onnxruntime")

    monkeypatch.setattr(onnxruntime, "InferenceSession", reached)
    image = write_image(tmp_path / "r.png", COLOURS["red"])
    folder = _labelled_folder(tmp_path / "data")
    with pytest.raises(ServingError, match="keeps its data at .*" + why):
        from sbn_surgery.serving import predict

        predict(model, [image])
    for args in (("predict", model, image), ("validate", model, "-d", folder),
                 ("quantize", model, "-d", folder, "-o", tmp_path / "q.onnx")):
        one_line_error(run_cli(*args), "m.onnx", "tensor 'w'", why, "Refused before reading it")
    assert not (tmp_path / "q.onnx").exists()


def test_external_data_inside_the_folder_serves(tmp_path):
    from sbn_surgery.serving import predict

    (tmp_path / "model").mkdir()
    model = colour_model(tmp_path / "model" / "m.onnx", external="m.onnx.data")
    assert (tmp_path / "model" / "m.onnx.data").stat().st_size > 0
    image = write_image(tmp_path / "b.png", COLOURS["blue"])
    top = predict(model, [image], k=3).predictions[0]
    assert top.classes[0] == "blue"
    np.testing.assert_allclose(top.probs, np.sort(expected_probs(COLOURS["blue"]))[::-1],
                               atol=1e-5)


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------
def _labelled_folder(root: Path, train_per_class: int = 4) -> Path:
    """train/ and val/ in ImageFolder layout; in val, one blue image sits in the red folder
    (so the right top-1 is 5/6: each class has two images, one of them mislabelled)."""
    for split, n in (("train", train_per_class), ("val", 2)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shade = tuple(max(0, v - 9 * i) for v in rgb)
                write_image(root / split / name / f"{i}.png", shade, size=(20 + i, 26))
    write_image(root / "val" / "red" / "1.png", COLOURS["blue"])
    return root


def test_validate_on_a_labelled_folder(run_cli, model_file, tmp_path):
    folder = _labelled_folder(tmp_path / "data")
    res = run_cli("validate", model_file, "--data", folder, "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["images"] == 6 and data["top1"] == pytest.approx(5 / 6)
    assert data["top5"] is None  # 3 classes: top-5 is top-all, not reported
    assert data["preprocessing"] == CFG and data["images_per_s"] > 0
    res = run_cli("validate", model_file, "--data", folder)
    assert res.code == 0 and "83.33 %" in res.stdout
    # --subset reads the folder through the data sources (torch's ImageFolder), as finetune
    # does: a subset larger than the split keeps every image, so the same score
    res = run_cli("validate", model_file, "--data", folder, "--subset", "100", "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["top1"] == pytest.approx(5 / 6)


@pytest.mark.timeout(60)
def test_validate_bad_inputs_are_one_line(run_cli, model_file, tmp_path):
    folder = _labelled_folder(tmp_path / "data")
    one_line_error(run_cli("validate", _no_metadata(tmp_path), "--data", folder),
                   "no preprocessing metadata")
    one_line_error(run_cli("validate", model_file, "--data", "digits"),
                   "3 outputs", "10 classes")
    one_line_error(run_cli("validate", model_file, "--data", tmp_path / "nowhere"),
                   "does not exist")
    bad = folder / "val" / "green" / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    one_line_error(run_cli("validate", model_file, "--data", folder), "broken.png")


# --------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------
def test_quantize_writes_an_int8_file_that_keeps_the_metadata(run_cli, model_file, tmp_path):
    import onnx

    from sbn_surgery.onnx_io import read_onnx_metadata

    folder = _labelled_folder(tmp_path / "data")
    target = tmp_path / "colours.int8.onnx"
    stale = tmp_path / ".colours.int8.onnx.sbn-stage-0123abcd"  # a killed quantize's staging
    stale.mkdir()
    (stale / "colours.int8.onnx").write_bytes(b"half an int8 file")
    res = run_cli("quantize", model_file, "--data", folder, "-o", target,
                  "--calibration-images", "6", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["passed"] and data["int8"]["top1"] == pytest.approx(5 / 6)
    assert data["top1_agreement"] == 1.0 and data["quantization"]["calibration_images"] == 6
    ops = {n.op_type for n in onnx.load(str(target)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = read_onnx_metadata(target)
    assert meta["classes"] == CLASSES and meta["data_config"] == CFG
    assert meta["quantization"]["format"] == "QDQ"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left,
    # the stale one swept
    # and the int8 file serves like the float one
    from sbn_surgery.serving import predict

    image = write_image(tmp_path / "g.png", COLOURS["green"])
    assert predict(target, [image], k=1).predictions[0].classes == ["green"]


def test_a_quantized_file_that_misses_its_bounds_is_kept_aside(run_cli, model_file, tmp_path,
                                                               monkeypatch):
    import sbn_surgery.accuracy as acc

    real = acc.evaluate

    def worse(models, samples, transform, **kw):  # the int8 file loses a third of its hits
        report = real(models, samples, transform, **kw)
        report["int8"].top1 -= 0.3
        report["int8"].agreement = 0.7
        return report

    monkeypatch.setattr(acc, "evaluate", worse)
    folder = _labelled_folder(tmp_path / "data")
    target = tmp_path / "colours.int8.onnx"
    target.write_bytes(b"a good file from before")
    res = run_cli("quantize", model_file, "--data", folder, "-o", target,
                  "--calibration-images", "6")
    line = one_line_error(res, "misses its bounds", "colours.int8-failed.onnx")
    assert "30.00 points" in line
    assert target.read_bytes() == b"a good file from before"
    assert (tmp_path / "colours.int8-failed.onnx").is_file()
    assert "FAILED" in res.stdout


@pytest.mark.timeout(60)
def test_quantize_bad_inputs_are_one_line_and_replace_nothing(run_cli, model_file, tmp_path):
    from onnx import TensorProto

    folder = _labelled_folder(tmp_path / "data", train_per_class=2)  # 6 training images
    target = tmp_path / "out.int8.onnx"
    target.write_bytes(b"keep me")
    before = digests(tmp_path)
    one_line_error(run_cli("quantize", model_file, "-d", folder, "-o", target,
                           "--calibration-images", "7"), "holds 6 images", "fewer than the 7")
    one_line_error(run_cli("quantize", _no_metadata(tmp_path), "-d", folder, "-o", target),
                   "no preprocessing metadata")
    one_line_error(run_cli("quantize", colour_model(tmp_path / "i.onnx", in_type=TensorProto.INT64),
                           "-d", folder, "-o", target), "float32 image input")
    one_line_error(run_cli("quantize", model_file, "-d", folder, "-o", model_file),
                   "the float file itself")
    one_line_error(run_cli("quantize", model_file, "-d", folder, "-o", tmp_path / "x.bin"),
                   ".onnx file to write")
    broken = _labelled_folder(tmp_path / "broken", train_per_class=2)
    (broken / "train" / "green" / "1.png").write_bytes(b"\x89PNG but cut short")
    line = one_line_error(run_cli("quantize", model_file, "-d", broken, "-o", target,
                                  "--calibration-images", "6"), "1.png")
    assert "onnxruntime" not in line  # the image's error, not blamed on the quantizer
    after = digests(tmp_path)
    assert {k: after[k] for k in before} == before
    assert target.read_bytes() == b"keep me"


# --------------------------------------------------------------------------------------------
# bench side by side
# --------------------------------------------------------------------------------------------
def test_bench_times_files_side_by_side(run_cli, model_file, tmp_path):
    from sbn_surgery.parity import bench

    other = colour_model(tmp_path / "other.onnx")
    report = bench([model_file, other], batch=2, repeats=3, warmup=1, input_size=(3, 24, 24))
    assert [f.onnx for f in report.files] == [str(model_file), str(other)]
    first, second = report.files
    assert first.ratio == 1.0 and second.ratio == pytest.approx(second.latency_ms / first.latency_ms)
    report = bench([model_file, other], against=model_file, repeats=2, input_size=(3, 24, 24))
    assert len(report.files) == 3 and report.files[-1].ratio == 1.0
    assert report.ratio == pytest.approx(report.latency_ms / report.against_latency_ms)
    res = run_cli("bench", model_file, other, "--input-size", "3", "24", "24", "--repeats", "2",
                  "--json")
    assert res.code == 0, res.stderr
    assert [f["onnx"] for f in json.loads(res.stdout)["files"]] == [str(model_file), str(other)]


def test_serving_errors_are_user_errors():
    from sbn_surgery.errors import SbnSurgeryError

    assert issubclass(ServingError, SbnSurgeryError)


def test_frequency_mode_sbn_nodes_stay_in_float():
    from onnx import helper

    from sbn_surgery.serving.quantize import float_nodes

    names = ["conv1", "SpectralBatchNorm/layer3.0.bn2.sbn/add", "SpectralBatchNorm/layer4.0.bn2.sbn/mm",
             "SpectralBatchNorm/layer4.0.bn2.sbn/add", "SpectralBatchNorm/layer4.0.bn2.sbnx/add"]
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"], name=n) for n in names],
                              "g", [], [])
    meta = {"sites": [{"module": "layer3.0.bn2.sbn", "stats": "channel"},
                      {"module": "layer4.0.bn2.sbn", "stats": "frequency"}]}
    kept, reasons = float_nodes(helper.make_model(graph), meta)
    assert kept == names[2:4]
    assert list(reasons) == ["SpectralBatchNorm/layer4.0.bn2.sbn/"]
    assert float_nodes(helper.make_model(graph), {}) == ([], {})


# --------------------------------------------------------------------------------------------
# timm's data sets: WebDataset shards and a tar archive (the data sources' readers)
# --------------------------------------------------------------------------------------------
def _mean_model(path: Path, w: np.ndarray, b: np.ndarray, cfg: dict) -> Path:
    """A 10-class ONNX model of 1-channel images: logits = w * mean(normalized image) + b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sbn_surgery.onnx_io import set_onnx_metadata

    inits = [numpy_helper.from_array(w.reshape(10, 1, 1, 1).astype(np.float32), "w"),
             numpy_helper.from_array(b.astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mean", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_onnx_metadata(model, {"data_config": cfg, "classes": [str(i) for i in range(10)]})
    onnx.save(model, str(path))
    return path


@pytest.mark.timeout(120)
def test_validate_and_quantize_read_timm_data_sets(run_cli, tmp_path):
    from test_data_timm import CFG as DIGITS_CFG
    from test_data_timm import _digits, _write_tar, _write_wds

    train, val = _digits()
    _write_wds(tmp_path / "wds", train, val)
    _write_tar(tmp_path / "tar", train, val)
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal(10), rng.standard_normal(10)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in DIGITS_CFG.items()}
    model = _mean_model(tmp_path / "m.onnx", w, b, cfg)
    # by hand: 8x8 images at their size are only normalized; the model sees their mean
    means = (val[0].astype(np.float64) / 255.0 - 0.5).mean(axis=(1, 2)) / 0.5
    want = float(np.mean(np.argmax(np.outer(means, w) + b, axis=1) == val[1]))
    for where, dataset in (("wds", "wds/digits"), ("tar", "tar")):
        res = run_cli("validate", model, "--data", tmp_path / where, "--dataset", dataset,
                      "--json")
        assert res.code == 0, res.stderr
        data = json.loads(res.stdout)
        assert data["images"] == len(val[1]) and data["top1"] == pytest.approx(want), where
    res = run_cli("quantize", model, "--data", tmp_path / "wds", "--dataset", "wds/digits",
                  "-o", tmp_path / "m.int8.onnx", "--calibration-images", "32",
                  "--min-agreement", "0.5", "--max-top1-drop", "100", "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["quantization"]["calibration_images"] == 32
