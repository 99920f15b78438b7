"""What export writes for serving (data config, class names) and where it takes them from; and,
end to end on digits (slow), that a fine-tuned model's file validates at the top-1 fine-tuning
reported, quantizes within its bounds and predicts the right class."""

from __future__ import annotations

import json

import pytest
import torch

from sbn_surgery.errors import ServingError
from sbn_surgery.export.exporter import serving_metadata

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(num_classes: int):
    import timm

    model = timm.create_model("resnet10t", num_classes=num_classes)
    model.sbn_meta = {"model_name": "resnet10t"}
    return model


def test_a_model_with_imagenets_classes_gets_timms_label_names():
    from timm.data import ImageNetInfo

    from timm.data import resolve_data_config

    model = _model(1000)
    meta = serving_metadata(model, (3, 64, 48))
    assert meta["classes"] == ImageNetInfo("imagenet-1k").label_descriptions()
    assert meta["classes"][1].startswith("goldfish") and meta["classes_source"] == "timm label set"
    cfg = meta["data_config"]
    # timm's own data config for resnet10t, at the export size
    want = resolve_data_config({"input_size": (3, 64, 48)}, model=model)
    assert cfg["input_size"] == [3, 64, 48]
    assert cfg["interpolation"] == want["interpolation"] == "bicubic"
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (want["crop_pct"], want["crop_mode"])
    assert cfg["mean"] == list(want["mean"]) and cfg["std"] == list(want["std"])


def test_other_class_counts_get_the_indices():
    meta = serving_metadata(_model(7), (3, 32, 32))
    assert meta["classes"] == [str(i) for i in range(7)] and meta["classes_source"] == "indices"


def test_what_the_checkpoint_stores_wins_and_is_checked():
    model = _model(3)
    stored = {"input_size": [3, 64, 64], "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
              "interpolation": "lanczos", "crop_pct": 1.0, "crop_mode": "squash",
              "num_classes": 3, "label_names": ["cat", "dog", "bird"]}
    model.sbn_meta["pretrained_cfg"] = stored
    meta = serving_metadata(model, (3, 80, 80))
    assert meta["classes"] == ["cat", "dog", "bird"]
    assert meta["classes_source"] == "checkpoint (label_names)"
    want = {k: stored[k] for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")}
    assert meta["data_config"] == {**want, "input_size": [3, 80, 80]}
    # names for another head (e.g. the weights' 1000 before a reset to 3): the indices
    model.sbn_meta["pretrained_cfg"] = {**stored, "label_names": ["cat", "dog"]}
    assert serving_metadata(model, (3, 64, 64))["classes"] == ["0", "1", "2"]
    model.sbn_meta["pretrained_cfg"] = {**stored, "std": [0, 1, 1]}
    with pytest.raises(ServingError, match="std must be > 0"):
        serving_metadata(model, (3, 64, 64))


def test_a_one_channel_model_of_three_channel_weights_gets_one_mean_and_std(tmp_path):
    """Converting with in_chans=1 records the weights' 3-channel mean and std; export's data
    config, and read_data_config, give the model's one channel their average (timm adapts the
    first convolution the same way), instead of refusing 3 values for 1 channel."""
    from timm.data import resolve_data_config

    from sbn_surgery import convert, save_converted
    from sbn_surgery.checkpoint import read_data_config
    from sbn_surgery.export.exporter import check_export_options

    model, _ = convert("resnet10t", "resnet", num_classes=3, input_size=(1, 32, 32),
                       model_kwargs={"in_chans": 1})
    weights = resolve_data_config({}, model=model)
    assert len(model.sbn_meta["pretrained_cfg"]["mean"]) == 3  # as the weights were trained
    mean, std = sum(weights["mean"]) / 3, sum(weights["std"]) / 3
    cfg = serving_metadata(model, (1, 32, 32))["data_config"]
    assert cfg["input_size"] == [1, 32, 32]
    assert cfg["mean"] == pytest.approx([mean]) and cfg["std"] == pytest.approx([std])
    check_export_options(model, tmp_path / "m.onnx", "fold", 20, None, True, None, 1)
    save_converted(model, tmp_path / "m.safetensors")
    got = read_data_config(tmp_path / "m.safetensors")
    assert got["input_size"] == (1, 32, 32)
    assert got["mean"] == pytest.approx((mean,)) and got["std"] == pytest.approx((std,))


def test_an_edited_model_fails_before_the_trace(tmp_path):
    from sbn_surgery import convert, export_onnx

    model, _ = convert("resnet10t", "resnet", num_classes=3, input_size=(3, 32, 32),
                       calibration=[torch.randn(4, 3, 32, 32)])
    model.sbn_meta["pretrained_cfg"] = {"interpolation": "sinc"}
    with pytest.raises(ServingError, match="interpolation must be one of"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.glob("*.onnx"))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """resnet10t + SBN fine-tuned one epoch on digits at 32x32, exported (fold)."""
    from sbn_surgery import export_onnx, finetune
    from sbn_surgery.checkpoint import load_converted

    out = tmp_path_factory.mktemp("digits")
    result = finetune("resnet10t", "digits", output=out / "run", epochs=1, batch_size=32,
                      input_size=(3, 32, 32), model_kwargs={"output_stride": 8}, seed=0)
    export_onnx(load_converted(result.checkpoint), out / "r10.onnx")
    return result, out


@pytest.mark.slow
def test_validate_gives_the_top1_fine_tuning_reported(digits_run, run_cli):
    from sbn_surgery.onnx_io import read_onnx_metadata

    result, out = digits_run
    meta = read_onnx_metadata(out / "r10.onnx")
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["classes_source"] == "checkpoint (label_names)"
    assert meta["data_config"]["input_size"] == [3, 32, 32]
    assert (meta["data_config"]["crop_pct"], meta["data_config"]["crop_mode"]) == (1.0, "squash")
    res = run_cli("validate", out / "r10.onnx", "--data", "digits", "--checkpoint",
                  result.checkpoint, "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    images = data["images"]
    assert images == 359  # digits' validation split
    # the same images, preprocessed the same way: within one image of fine-tuning's figure
    assert abs(data["top1"] - result.best_top1) * images <= 1
    assert abs(data["checkpoint"]["top1"] - result.best_top1) * images < 0.5
    assert data["checkpoint"]["top1_agreement"] >= 1 - 1 / images


@pytest.mark.slow
def test_quantize_and_predict_a_fine_tuned_model(digits_run, run_cli, tmp_path):
    import numpy as np
    from PIL import Image

    from sbn_surgery.checkpoint import load_converted
    from sbn_surgery.data import open_source
    from sbn_surgery.data.transforms import prepare_batch
    from sbn_surgery.onnx_io import read_onnx_metadata
    from sbn_surgery.serving import predict

    result, out = digits_run
    target = tmp_path / "r10.int8.onnx"
    res = run_cli("quantize", out / "r10.onnx", "--data", "digits", "-o", target,
                  "--calibration-images", "64", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["passed"] and data["top1_drop_points"] <= 1.0 and data["top1_agreement"] >= 0.98
    images = open_source("digits").val.images[:24]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img[0].numpy(), "L").save(paths[-1])
    # the PyTorch model on fine-tuning's own batched preprocessing: the classes predict must name
    cfg = read_onnx_metadata(out / "r10.onnx")["data_config"]
    with torch.no_grad():
        logits = load_converted(result.checkpoint).eval()(prepare_batch(images, cfg))
    want = [str(int(i)) for i in logits.argmax(1)]
    float_top = [p.classes[0] for p in predict(out / "r10.onnx", paths, k=1).predictions]
    int8_top = [p.classes[0] for p in predict(target, paths, k=1).predictions]
    assert float_top == want
    assert np.mean([a == b for a, b in zip(float_top, int8_top)]) >= 0.9


@pytest.mark.slow
def test_quantize_keeps_frequency_mode_sbn_in_float(tmp_path):
    """resnet10t with a channel-mode and a frequency-mode SBN (conftest's ARCHS): the int8 file
    quantizes the convolutions and leaves the frequency-mode layer's DFT products in float."""
    import numpy as np
    import onnx
    from conftest import converted

    from sbn_surgery import export_onnx
    from sbn_surgery.serving import ServingModel
    from sbn_surgery.serving.quantize import SBN_PREFIX, quantize_file

    model, plan, size = converted("resnet10t")
    freq = [s.module for s in plan.sites if s.stats == "frequency"]
    assert freq and len(freq) < len(plan.sites)
    export_onnx(model, tmp_path / "m.onnx", input_size=size)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, *size)).astype(np.float32) for _ in range(4)]
    result = quantize_file(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", iter(batches), 16)
    assert list(result.float_nodes) == [f"{SBN_PREFIX}{m}/" for m in freq]
    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    ops = {}
    for node in graph.node:
        for module in freq:
            if node.name.startswith(f"{SBN_PREFIX}{module}/"):
                ops.setdefault(module, set()).add(node.op_type)
    assert all("MatMul" in o and not o & {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul"}
               for o in ops.values()) and len(ops) == len(freq)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10  # the rest is int8
    x = rng.standard_normal((8, *size)).astype(np.float32)
    ref = ServingModel(tmp_path / "m.onnx").logits(x)
    got = ServingModel(tmp_path / "m.int8.onnx").logits(x)
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()  # int8 rounding, not a new model


def test_imagenet_wordnet_ids_become_timms_readable_names():
    from timm.data import ImageNetInfo

    model = _model(1000)
    info = ImageNetInfo("imagenet-1k")
    model.sbn_meta["pretrained_cfg"] = {"label_names": info.label_names()}  # as --pretrained
    meta = serving_metadata(model, (3, 64, 64))
    assert meta["classes"] == info.label_descriptions() and meta["classes"][0].startswith("tench")
