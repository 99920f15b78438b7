"""Checkpoints in every layout a timm user has: timm train.py's CheckpointSaver output (EMA and
argparse args included), DDP/torch.compile prefixes, Hugging Face/timm snapshot directories;
through convert, finetune and diagnose, CLI and Python API."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from conftest import one_line_error
from safetensors.torch import save_file
from torch import nn

import sbn_surgery as sbn
from sbn_surgery.errors import CheckpointError, ModelError
from sbn_surgery.layers import SpectralBatchNorm2d

SMALL = ["--input-size", "3", "32", "32"]
NAME = "resnet10t"


def _trained(seed: int, num_classes: int = 10) -> nn.Module:
    """A resnet10t whose weights and BN statistics differ from any fresh init."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {"plain": _trained(1), "ema": _trained(2)}


def _assert_same_function(converted: nn.Module, ref: nn.Module) -> None:
    assert sum(isinstance(m, SpectralBatchNorm2d) for m in converted.modules()) > 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref.eval()(x), converted.eval()(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def _convert_cli(run_cli, tmp_path, ckpt, *extra):
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", NAME, "--recipe", "resnet", "--checkpoint", ckpt, "-o", out,
                     "--json", *SMALL, *extra)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["init"] == "identity"
    return sbn.load_converted(out)


class _DDPLike(nn.Module):
    """Holds the model as ``.module``, as DistributedDataParallel does: keys gain ``module.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model


@pytest.fixture(scope="module")
def timm_train_checkpoint(tmp_path_factory, models):
    """What timm's train.py writes: CheckpointSaver, a DDP-wrapped model and its EMA (no unwrap,
    so every key has ``module.``), the optimizer, the metric and the argparse args."""
    from timm.utils import CheckpointSaver

    folder = tmp_path_factory.mktemp("timm-train")
    model = _DDPLike(models["plain"])
    ema = _DDPLike(models["ema"])
    args = argparse.Namespace(model=NAME, lr=0.1, epochs=3, mean=(0.5, 0.5, 0.5), amp=False)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            model_ema=ema, checkpoint_dir=str(folder), unwrap_fn=lambda m: m)
    saver.save_checkpoint(epoch=2, metric=71.5)
    path = folder / "last.pth.tar"
    raw = torch.load(path, weights_only=False)  # our own file, to check what the test built
    assert isinstance(raw["args"], argparse.Namespace)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert {"state_dict_ema", "optimizer", "epoch", "version", "arch", "metric"} <= set(raw)
    return path


def test_timm_train_checkpoint_converts_its_state_dict(run_cli, tmp_path, models,
                                                       timm_train_checkpoint):
    converted = _convert_cli(run_cli, tmp_path, timm_train_checkpoint, "--num-classes", "10")
    _assert_same_function(converted, models["plain"])


def test_checkpoint_key_selects_the_ema_weights(run_cli, tmp_path, models, timm_train_checkpoint):
    converted = _convert_cli(run_cli, tmp_path, timm_train_checkpoint, "--num-classes", "10",
                             "--checkpoint-key", "state_dict_ema")
    _assert_same_function(converted, models["ema"])


def test_wrong_checkpoint_key_lists_the_keys(run_cli, tmp_path, timm_train_checkpoint):
    out = tmp_path / "never.safetensors"
    for key, fragment in (("ema", "is not in"), ("optimizer", "does not hold a state dict"),
                          ("metric", "does not hold a state dict")):
        result = run_cli("convert", NAME, "--checkpoint", timm_train_checkpoint, "-o", out,
                         "--checkpoint-key", key, *SMALL)
        one_line_error(result, f"--checkpoint-key {key!r}", fragment, "state_dict_ema",
                        "optimizer", "args")
    assert not out.exists()


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module.",
                                    "module.module."])
@pytest.mark.slow
def test_wrapper_prefixes_are_removed(run_cli, tmp_path, models, prefix):
    ckpt = tmp_path / "wrapped.pth"
    torch.save({prefix + k: v for k, v in models["plain"].state_dict().items()}, ckpt)
    converted = _convert_cli(run_cli, tmp_path, ckpt, "--num-classes", "10")
    _assert_same_function(converted, models["plain"])


def _snapshot(folder, model, weights: str, config: dict):
    folder.mkdir()
    if weights == "model.safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / weights)
    else:
        torch.save(model.state_dict(), folder / weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_snapshot_directory_converts_with_its_class_count(run_cli, tmp_path, models, weights):
    """No --num-classes: the snapshot's config.json says 10, as timm's hub configs do."""
    snap = _snapshot(tmp_path / "snap", models["plain"], weights,
                     {"architecture": NAME, "num_classes": 10, "num_features": 512,
                      "pretrained_cfg": {"file": "/etc/passwd", "hf_hub_id": "x/y"}})
    converted = _convert_cli(run_cli, tmp_path, snap)
    _assert_same_function(converted, models["plain"])


def test_snapshot_of_another_architecture_is_refused(run_cli, tmp_path, models):
    snap = _snapshot(tmp_path / "snap", models["plain"], "model.safetensors",
                     {"architecture": "resnet18.a1_in1k", "num_classes": 10})
    result = run_cli("convert", NAME, "--checkpoint", snap, "-o", tmp_path / "x.safetensors", *SMALL)
    one_line_error(result, "is a resnet18.a1_in1k", "give the model name resnet18")


@pytest.mark.slow
def test_python_api_takes_every_layout(tmp_path, models, timm_train_checkpoint):
    snap = _snapshot(tmp_path / "snap", models["plain"], "model.safetensors",
                     {"architecture": NAME, "num_classes": 10})
    for ckpt, key, n_cls, ref in ((timm_train_checkpoint, None, 10, "plain"),
                                  (timm_train_checkpoint, "state_dict_ema", 10, "ema"),
                                  (snap, None, None, "plain")):  # the class count from config.json
        converted, _ = sbn.convert(NAME, "resnet", checkpoint=ckpt, checkpoint_key=key,
                                   num_classes=n_cls, input_size=(3, 32, 32))
        _assert_same_function(converted, models[ref])
    with pytest.raises(CheckpointError, match="needs --checkpoint|give --checkpoint"):
        sbn.convert(NAME, "resnet", checkpoint_key="state_dict_ema", input_size=(3, 32, 32))


@pytest.mark.slow
def test_finetune_builds_from_the_key_asked(tmp_path, models, timm_train_checkpoint):
    from sbn_surgery.data import open_source
    from sbn_surgery.train import finetune
    from sbn_surgery.train.model import build_model
    from sbn_surgery.train.options import RunOptions, resolve

    opts = resolve(RunOptions(model=NAME, data="synthetic", recipe="resnet", subset=32,
                              checkpoint=str(timm_train_checkpoint), checkpoint_key="state_dict_ema",
                              num_classes=10, input_size=(3, 32, 32)))
    net, _ = build_model(NAME, opts, open_source("synthetic"))
    _assert_same_function(net, models["ema"])
    with pytest.raises(CheckpointError, match="'nope' is not in"):
        finetune(NAME, "synthetic", output=tmp_path / "run", checkpoint=str(timm_train_checkpoint),
                 checkpoint_key="nope", num_classes=10, epochs=1, subset=32, batch_size=16,
                 input_size=(3, 32, 32))
    assert not (tmp_path / "run" / "state.pt").exists()


def test_diagnose_reads_the_key_asked(run_cli, models, timm_train_checkpoint):
    from sbn_surgery.diagnose import load_model

    net = load_model(NAME, checkpoint=timm_train_checkpoint, checkpoint_key="state_dict_ema",
                     num_classes=10)
    for k, v in models["ema"].state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    result = run_cli("diagnose", NAME, "--checkpoint", timm_train_checkpoint, "--num-classes", "10",
                     "--checkpoint-key", "state_dict_ema", "--json", "--batch-size", "2", *SMALL)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)
    one_line_error(run_cli("diagnose", NAME, "--checkpoint", timm_train_checkpoint,
                            "--checkpoint-key", "model_ema", *SMALL), "'model_ema' is not in")


def test_model_kwargs_that_read_files_are_refused():
    from sbn_surgery.models import create_model

    for key in ("pretrained", "checkpoint_path", "pretrained_cfg_overlay", "cache_dir"):
        with pytest.raises(ModelError, match=f"{key!r} is refused"):
            create_model(NAME, model_kwargs={key: "x"})
    from timm.layers import DropPath

    model = create_model(NAME, model_kwargs={"drop_path_rate": 0.1})
    probs = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert probs and max(probs) == pytest.approx(0.1)  # the argument reached timm
