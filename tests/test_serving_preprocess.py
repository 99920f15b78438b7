"""The serving package's eval preprocessing against timm's own ``create_transform`` (eval) on real
photographs (scikit-learn's bundled sample images) in every mode a user hands over, every
interpolation, crop mode and crop fraction; and the built-in sources' batched path against the
data config fine-tuning records for them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sbn_surgery.errors import ServingError
from sbn_surgery.imaging import INTERPOLATIONS, load_image
from sbn_surgery.serving import EvalTransform, check_data_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Files of real photographs: RGB (JPEG as shipped, and PNG), grayscale, RGBA, a palette
    image with transparency, LA; non-square crops larger and smaller than the targets below."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)  # 640x427
    files = {}

    def save(name, img):
        files[name] = str(folder / name)
        img.save(files[name])

    save("rgb.jpg", china)
    save("rgb-wide.png", flower.crop((0, 100, 400, 250)))          # 400x150: downscaled
    save("rgb-tall-small.png", china.crop((200, 50, 237, 121)))    # 37x71: upscaled
    save("gray.png", flower.convert("L").crop((10, 10, 300, 200)))
    rgba = china.crop((100, 100, 260, 220)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    save("rgba.png", rgba)
    pal = flower.crop((50, 0, 150, 90)).quantize(64)
    pal.info["transparency"] = 3
    save("palette.png", pal)
    save("la.png", china.convert("LA").crop((0, 0, 50, 40)))
    save("tiny.png", china.resize((7, 5)))
    return files


def _timm(cfg: dict, path: str) -> np.ndarray:
    """timm's eval transform on the file as timm's own datasets open it (``convert('RGB')``)."""
    from timm.data import create_transform

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return create_transform(**cfg, is_training=False)(rgb).numpy()


CASES = [  # (interpolation, crop_mode, crop_pct, input size)
    (interp, mode, pct, size)
    for i, interp in enumerate(INTERPOLATIONS)
    for j, mode in enumerate(("center", "squash", "border"))
    for pct, size in [((0.875, 1.0, 0.95)[(i + j) % 3], ((3, 64, 64), (3, 48, 80), (3, 96, 40))[(i + 2 * j) % 3])]
]


@pytest.mark.parametrize("interp,mode,pct,size", CASES)
def test_eval_transform_equals_timms_on_real_images(photos, interp, mode, pct, size):
    cfg = {"input_size": size, "mean": MEAN, "std": STD, "interpolation": interp,
           "crop_pct": pct, "crop_mode": mode}
    ours = EvalTransform(check_data_config(cfg, "test"))
    for name, path in photos.items():
        got = ours(load_image(path, 3))
        want = _timm(cfg, path)
        assert got.dtype == np.float32 and got.shape == want.shape == size, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=name)


def test_a_crop_larger_than_the_image_pads_as_timm_does(photos):
    # crop_pct above 1 resizes below the input size: torchvision's center crop pads with 0
    cfg = {"input_size": (3, 40, 56), "mean": MEAN, "std": STD, "interpolation": "bilinear",
           "crop_pct": 1.6, "crop_mode": "center"}
    got = EvalTransform(check_data_config(cfg, "test"))(load_image(photos["rgb.jpg"], 3))
    np.testing.assert_allclose(got, _timm(cfg, photos["rgb.jpg"]), rtol=0, atol=1e-5)
    zero = (0 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(got[:, 0, 0], zero, atol=1e-5)  # the padding really is there


def test_one_channel_models_get_luminance(photos):
    cfg = check_data_config({"input_size": [1, 32, 32], "mean": [0.5], "std": [0.25],
                             "interpolation": "bicubic", "crop_pct": 1.0}, "test")
    got = EvalTransform(cfg)(load_image(photos["rgb.jpg"], 1))
    from timm.data import create_transform

    with Image.open(photos["rgb.jpg"]) as img:
        want = create_transform(**cfg.to_json())(img.convert("L")).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_builtin_sources_batched_path_is_the_recorded_config():
    """Fine-tuning preprocesses the in-memory digits a batch at a time; the config it records
    for export (crop_pct 1.0, squash) must give the same input through timm's transform."""
    import torch
    from timm.data import create_transform

    from sbn_surgery.data import open_source
    from sbn_surgery.data.transforms import prepare_batch
    from sbn_surgery.pretrained_cfg import EVAL_KEYS
    from sbn_surgery.train.model import eval_preprocessing, record_preprocessing

    ds = open_source("digits")
    images = ds.val.images[:40]
    for interp in ("bicubic", "bilinear", "lanczos"):
        run_cfg = {"input_size": (3, 64, 48), "interpolation": interp, "mean": MEAN, "std": STD,
                   "crop_pct": 0.875, "crop_mode": None}
        model = torch.nn.Identity()
        model.sbn_meta = {}
        record_preprocessing(model, eval_preprocessing(ds, run_cfg), ds.classes)
        recorded = model.sbn_meta["pretrained_cfg"]
        assert recorded["label_names"] == [str(i) for i in range(10)]
        cfg = {k: recorded[k] for k in EVAL_KEYS}
        assert (cfg["crop_pct"], cfg["crop_mode"]) == (1.0, "squash")
        batched = prepare_batch(images, run_cfg).numpy()
        timm_tf = create_transform(**cfg)
        ours = EvalTransform(check_data_config(cfg, "test"))
        for i, img in enumerate(images):
            pil = Image.fromarray(img[0].numpy(), "L")
            np.testing.assert_allclose(batched[i], timm_tf(pil.convert("RGB")).numpy(), atol=1e-6)
            np.testing.assert_allclose(batched[i], ours(pil), atol=1e-5)


@pytest.mark.parametrize("bad,fragment", [
    ({"input_size": [3, 64]}, "input_size"),
    ({"input_size": [3, 64, 10 ** 6]}, "input_size"),
    ({"input_size": [3, 8, 8], "mean": [0.1, "x", 0.2]}, "mean"),
    ({"input_size": [3, 8, 8], "std": [0.1, 0.0, 0.2]}, "std must be > 0"),
    ({"input_size": [3, 8, 8], "std": [float("nan")] * 3}, "std"),
    ({"input_size": [3, 8, 8], "mean": [0.1, 0.2]}, "2 values for 3"),
    ({"input_size": [3, 8, 8], "interpolation": "random"}, "interpolation"),
    ({"input_size": [3, 8, 8], "crop_pct": 0}, "crop_pct"),
    ({"input_size": [3, 8, 8], "crop_mode": "zoom"}, "crop_mode"),
    ("not a mapping", "mapping"),
])
def test_a_hostile_data_config_is_one_error(bad, fragment):
    with pytest.raises(ServingError, match=fragment):
        check_data_config(bad, "model.onnx")


@pytest.mark.parametrize("channels", [2, 4])
def test_a_model_of_other_than_one_or_three_channels_is_refused_for_images(channels):
    """A data config may describe a 4-channel model (export writes it); images give only L or
    RGB, so serving refuses it by name instead of failing in the normalization."""
    cfg = check_data_config({"input_size": [channels, 8, 8]}, "four.onnx")  # valid metadata
    with pytest.raises(ServingError, match=f"four.onnx: the model takes {channels}-channel input"):
        EvalTransform(cfg, "four.onnx")
    assert EvalTransform(check_data_config({"input_size": [1, 8, 8]}, "one.onnx")).mode == "L"
