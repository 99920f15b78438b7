"""A baseline is one command: ``convert MODEL --recipe none`` writes the model without SBN as a
converted file that load_converted, export, bench and diagnose take; a study's ``none`` arm is
such a file; a plain state dict handed to export says what to run. And convert says what it did:
the head it left out, the images it calibrated on."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import sbn_surgery as sbn
from conftest import one_line_error

SMALL = ["--input-size", "3", "32", "32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(tmp_path, classes: int = 10):
    """A resnet10t with random (non-default) BatchNorm statistics, saved with torch.save."""
    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False, num_classes=classes)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.normal_(0, 0.2)
    path = tmp_path / "r10.pth"
    torch.save(src.state_dict(), path)
    return src.eval(), path


@pytest.fixture
def baseline(tmp_path, run_cli):
    src, ckpt = _trained_like(tmp_path)
    out = tmp_path / "r10-none.safetensors"
    result = run_cli("convert", "resnet10t", "--recipe", "none", "-c", ckpt, "--num-classes",
                     "10", "-o", out, "--json", *SMALL)
    assert result.code == 0, result.stderr
    return src, out, json.loads(result.stdout)


def test_convert_recipe_none_writes_the_model_without_sbn(baseline):
    src, out, data = baseline
    assert data["recipe"] == "none" and data["count"] == 0 and data["init"] == "none"
    assert data["calibration"] is None and data["head"] is None  # nothing calibrated or reset
    model = sbn.load_converted(out).eval()
    assert sbn.find_sbn(model) == []
    assert model.state_dict().keys() == src.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))  # the very model: the same weights, no layer added
    assert model.sbn_meta["recipe_name"] == "none" and model.sbn_meta["input_size"] == [3, 32, 32]


def test_convert_recipe_none_says_so_in_one_line(run_cli, tmp_path):
    result = run_cli("convert", "resnet10t", "-r", "none", "-o", tmp_path / "b.safetensors",
                     "--calibrate-data", "digits", *SMALL)
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "No SBN layer (recipe none)" in text and "┏" not in result.stdout  # no empty table
    assert "calibration:" not in text  # nothing was calibrated, and no line claims it was


def test_none_is_a_shipped_recipe_without_rules(run_cli):
    recipe = sbn.load_recipe("none")
    assert recipe.rules == [] and not recipe.models
    listed = {r["name"]: r for r in json.loads(run_cli("recipes", "--json").stdout)["recipes"]}
    assert listed["none"]["rules"] == 0
    from sbn_surgery.recipe import recipe_for_model

    assert recipe_for_model("resnet18") == "resnet"  # none is never picked for a model
    with pytest.raises(sbn.SbnSurgeryError, match="rules"):  # leaving rules out is still an error
        sbn.Recipe.from_yaml_text("name: x\n", source="x.yaml")


def test_the_baseline_diagnoses_like_any_converted_file(baseline, run_cli):
    _, out, _ = baseline
    result = run_cli("diagnose", out, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "resnet10t" and report["layers"]


@pytest.mark.slow
def test_the_baseline_exports_and_benches_against_an_sbn_file(baseline, run_cli, tmp_path):
    _, out, _ = baseline
    base_onnx = tmp_path / "base.onnx"
    exported = run_cli("export", out, "-o", base_onnx, "--json")
    assert exported.code == 0, exported.stderr
    data = json.loads(exported.stdout)
    assert data["parity"]["passed"] and data["sites"] == []
    sbn_file = tmp_path / "sbn.safetensors"
    assert run_cli("convert", "resnet10t", "-r", "resnet", "--num-classes", "10", "-o",
                   sbn_file, *SMALL).code == 0
    assert run_cli("export", sbn_file, "-o", tmp_path / "sbn.onnx", "--fixed-size").code == 0
    bench = run_cli("bench", tmp_path / "sbn.onnx", "--against", base_onnx, "--repeats", "2",
                    "--warmup", "1", "--json")
    assert bench.code == 0, bench.stderr
    assert json.loads(bench.stdout)["ratio"] > 0


@pytest.mark.parametrize("kind", ["pth", "plain-safetensors"])
def test_export_of_plain_weights_says_what_to_run(kind, tmp_path, run_cli):
    src, ckpt = _trained_like(tmp_path)
    if kind == "plain-safetensors":
        from safetensors.torch import save_file

        ckpt = tmp_path / "r10.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, ckpt)
    line = one_line_error(run_cli("export", ckpt, "-o", tmp_path / "x.onnx"),
                          f"sbn-surgery convert MODEL -c {ckpt} --recipe none -o "
                          "r10-none.safetensors", "--recipe RECIPE")
    assert "header claims" not in line
    assert not (tmp_path / "x.onnx").exists()


def test_a_study_none_arm_is_a_converted_file(tmp_path):
    from sbn_surgery.study.arms import build_arm_model, parse_arm

    net = build_arm_model(parse_arm("none"), "resnet10t", seed=0, num_classes=4,
                          checkpoint=None, model_kwargs=None, input_size=(3, 32, 32),
                          calibration=[])
    sbn.save_converted(net, tmp_path / "best.safetensors")
    loaded = sbn.load_converted(tmp_path / "best.safetensors").eval()
    assert sbn.find_sbn(loaded) == [] and loaded.num_classes == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    report = sbn.diagnose(loaded, [x])
    assert report.layers


def test_convert_says_which_head_it_left_out_and_which_images_calibrated(tmp_path, run_cli):
    _, ckpt = _trained_like(tmp_path, classes=10)
    out = tmp_path / "c4.safetensors"
    args = ("convert", "resnet10t", "-c", ckpt, "--num-classes", "4", "-o", out, *SMALL,
            "--calibrate-data", "digits", "--batch-size", "8", "--calibrate-batches", "3")
    data = json.loads(run_cli(*args, "--json").stdout)
    assert data["head"] == {"before": 10, "after": 4, "cause": "checkpoint"}
    assert data["calibration"] == {"source": "digits", "images": 24, "batches": 3}
    text = " ".join(run_cli(*args).stdout.split())
    assert "head: the checkpoint's 10-class classifier is left out; a new 4-class head" in text
    assert "calibration: SBN statistics from 24 training images of digits (3 batches)" in text
    plain = json.loads(run_cli("convert", "resnet10t", "--num-classes", "4", "-o", out,
                               *SMALL, "--json").stdout)
    assert plain["head"] is None  # no checkpoint: nothing left out
    assert plain["calibration"] is None and plain["init"] == "standard"


def test_the_calibrate_bar_reaches_the_batches_that_ran():
    """A data set smaller than batches x batch size gives fewer batches than asked for; the bar's
    total is what ran (it stopped at 3/4 on a 72-image folder)."""
    seen = []
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    from sbn_surgery.setup_report import SetupReport

    report = SetupReport()
    sbn.convert("resnet10t", "resnet", num_classes=4, input_size=(3, 32, 32), init="identity",
                calibration=iter(batches), calibrate_batches=4, calibration_source="x",
                progress=lambda d, done, total, info="": seen.append((d, done, total)),
                report=report)
    assert [s for s in seen if s[0] == "calibrate"][-1] == ("calibrate", 3, 3)
    assert report.calibration.images == 24 and report.calibration.batches == 3
