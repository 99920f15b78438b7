"""timm's data flags (--mean, --std, --interpolation, --crop-pct, --crop-mode; --scale, --ratio,
--hflip, --vflip, --color-jitter, --train-interpolation) reach timm's own transforms, and
fine-tuning preprocesses images as the weights expect unless told otherwise."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import HUB_NAME_HALF, HUB_USER_REPO
from test_data import _folder

import sbn_surgery.data as D
from sbn_surgery.data.transforms import data_config_for, prepare_batch
from sbn_surgery.errors import DataError
from sbn_surgery.train.model import build_model
from sbn_surgery.train.options import resolve

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
           crop_pct=0.8, crop_mode="center")


def _steps(loader) -> dict:
    """The steps of a loader's timm transform, by class name."""
    return {type(t).__name__: t for t in loader._images.transform.transforms}


def test_training_flags_reach_timms_create_transform(tmp_path):
    root = _folder(tmp_path / "ds", per=2)
    flags = dict(scale=[0.3, 0.9], ratio=[0.5, 2.0], hflip=0.2, vflip=0.7, color_jitter=0.25,
                 train_interpolation="bicubic")
    train, val, _ = D.build_loaders(str(root), CFG, 2, train_flags=flags)
    steps = _steps(train)
    crop = steps["RandomResizedCropAndInterpolation"]
    assert (crop.scale, crop.ratio) == ((0.3, 0.9), (0.5, 2.0))
    assert str(crop.interpolation).lower().endswith("bicubic")
    assert steps["RandomHorizontalFlip"].p == 0.2 and steps["RandomVerticalFlip"].p == 0.7
    assert steps["ColorJitter"].brightness == pytest.approx((0.75, 1.25))
    # left out: timm's own defaults, the transform create_transform makes without them
    from timm.data import create_transform

    plain = _steps(D.build_loaders(str(root), CFG, 2, train_flags={})[0])
    ref = {type(t).__name__: t for t in create_transform(
        (3, 16, 16), is_training=True, interpolation="bilinear", mean=CFG["mean"],
        std=CFG["std"]).transforms}
    assert {k: repr(v) for k, v in plain.items()} == {k: repr(v) for k, v in ref.items()}
    assert repr(plain["RandomResizedCropAndInterpolation"]) != repr(crop)
    # eval: the crop flags (16 / 0.8 = 20 before the centre crop)
    ev = _steps(val)
    assert ev["Resize"].size == 20 and ev["CenterCrop"].size == (16, 16)
    xs = [x for x, _ in train.iter_epoch(0)]
    assert all(x.shape[1:] == (3, 16, 16) for x in xs)


def test_eval_flags_override_the_weights_preprocessing():
    model = timm.create_model("resnet10t")  # its pretrained_cfg: ImageNet's mean, bicubic
    cfg = data_config_for(model, (3, 32, 32), 3, {"mean": [0.5], "std": [0.1, 0.2, 0.3],
                                                  "interpolation": "nearest", "crop_pct": 0.5,
                                                  "crop_mode": "squash", "hflip": 0.0})
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.1, 0.2, 0.3)
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("nearest", 0.5, "squash")
    assert data_config_for(model, (3, 32, 32), 3)["interpolation"] == "bicubic"  # the weights'
    with pytest.raises(DataError, match="--mean has 2 values; the model takes 3 input"):
        data_config_for(model, None, None, {"mean": [0.1, 0.2]})
    gray = data_config_for(timm.create_model("resnet10t", in_chans=1), (1, 32, 32), 1,
                           {"mean": [0.25], "std": [0.5]})
    assert gray["mean"] == (0.25,) and gray["std"] == (0.5,)


def test_in_memory_batches_use_the_interpolation_asked_for():
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    cfg = dict(input_size=(1, 16, 16), mean=(0.0,), std=(1.0,))
    near = prepare_batch(images, {**cfg, "interpolation": "nearest"})
    assert torch.equal(near[:, :, ::2, ::2], images.float() / 255)  # each pixel repeated
    assert not torch.equal(prepare_batch(images, {**cfg, "interpolation": "bilinear"}), near)


def test_finetune_preprocesses_as_the_weights_unless_told(offline_hub, no_fetch, tmp_path):
    ds = D.open_source("synthetic")
    base = {"model": HUB_NAME_HALF, "data": "synthetic", "input_size": [3, 32, 32],
            "pretrained": True, "batch_size": 8}
    net, cfg = build_model(HUB_NAME_HALF, resolve(base), ds, download=False)  # the cache's
    assert cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3  # the tag's, not ImageNet's
    assert net.sbn_meta["init"] == "identity"
    _, cfg = build_model(HUB_NAME_HALF, resolve({**base, "mean": [0.4, 0.45, 0.5],
                                                 "std": [0.2]}), ds, download=False)
    assert cfg["mean"] == (0.4, 0.45, 0.5) and cfg["std"] == (0.2,) * 3
    _, cfg = build_model("resnet10t", resolve({**base, "model": "resnet10t", "pretrained": None,
                                               "checkpoint": f"hf-hub:{HUB_USER_REPO}"}), ds)
    assert cfg["mean"] == (0.3,) * 3 and cfg["interpolation"] == "bilinear"  # its config.json's
    # a converted file carries them: fine-tuning it preprocesses the same way
    import sbn_surgery as sbn

    model, _ = sbn.convert("resnet10t", "resnet", checkpoint=f"hf-hub:{HUB_USER_REPO}",
                           input_size=(3, 32, 32))
    sbn.save_converted(model, tmp_path / "ten.safetensors")
    spec = str(tmp_path / "ten.safetensors")
    _, cfg = build_model(spec, resolve({"model": spec, "data": "synthetic"}), ds)
    assert cfg["mean"] == (0.3,) * 3 and cfg["std"] == (0.2, 0.25, 0.3) and cfg["crop_pct"] == 0.9


@pytest.mark.timeout(600)
def test_finetune_pretrained_records_what_it_trained_with(run_cli, offline_hub, tmp_path):
    from sbn_surgery.checkpoint import read_checkpoint_metadata, read_data_config
    from sbn_surgery.train.config import read_config

    out = tmp_path / "run"
    res = run_cli("finetune", HUB_NAME_HALF, "--pretrained", "-d", "synthetic", "--epochs", "1",
                  "--subset", "64", "--batch-size", "16", "--input-size", "3", "32", "32",
                  "--workers", "0", "-o", out, "--mean", "0.4,0.45,0.5", "--hflip", "0.1",
                  "--json")
    assert res.code == 0, res.stderr
    said = " ".join(res.stderr.split())
    assert "--hflip shape timm's transforms of images read from files" in said
    assert "random" not in said
    args = read_config(out / "args.yaml")  # the flags, recorded under timm's names
    assert args["pretrained"] is True and args["mean"] == [0.4, 0.45, 0.5]
    assert args["hflip"] == 0.1 and args["scale"] == [0.08, 1.0]
    cfg = read_checkpoint_metadata(out / "best.safetensors")["pretrained_cfg"]
    assert cfg["mean"] == [0.4, 0.45, 0.5] and cfg["std"] == [0.5] * 3  # given; the weights'
    assert cfg["input_size"] == [3, 32, 32] and cfg["num_classes"] == 10
    assert cfg["label_names"] == [f"class{i}" for i in range(10)]
    assert read_data_config(out / "last.safetensors")["mean"] == (0.4, 0.45, 0.5)
    # the same name without --pretrained trains from random weights, and says so
    res = run_cli("finetune", HUB_NAME_HALF, "-d", "synthetic", "--epochs", "1", "--subset",
                  "32", "--batch-size", "16", "--input-size", "3", "32", "32", "--workers", "0",
                  "-o", tmp_path / "random", "--json")
    assert res.code == 0, res.stderr
    assert "the weights are random" in " ".join(res.stderr.split())
