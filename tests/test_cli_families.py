"""The families without BatchNorm through the CLI with no --recipe: `inspect` picks the family's
recipe for the smallest model of each acceptance family, and (slow) convert -> finetune one
epoch on digits -> export in fold mode with parity, for one family per layout."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# model -> (recipe, layout of its sites, prefix tokens, SBN layers): the sites are each
# family's end of the MLP / residual branch in its deeper blocks (recipes/*.yaml)
ACCEPTANCE = {
    "vit_tiny_patch16_224": ("vit", "tokens", 1, 6),
    "deit_tiny_patch16_224": ("vit", "tokens", 1, 6),
    "deit_tiny_distilled_patch16_224": ("vit", "tokens", 2, 6),
    "eva02_tiny_patch14_224": ("vit", "tokens", 1, 6),
    "swin_tiny_patch4_window7_224": ("swin", "tokens", 0, 8),
    "nf_resnet26": ("nfnet", "nchw", 0, 4),
    "edgenext_xx_small": ("edgenext", "nhwc", 0, 8),
    "poolformer_s12": ("metaformer", "nchw", 0, 8),
    "convformer_s18": ("metaformer", "nchw", 0, 12),
    "mambaout_femto": ("mambaout", "nhwc", 0, 12),
    "pvt_v2_b0": ("pvt_v2", "tokens", 0, 4),
    "mixer_s16_224": ("mlp_mixer", "tokens", 0, 4),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _benchmark_models() -> dict:
    """benchmarks/families.py's MODELS: how each acceptance model is converted and trained."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "families.py"
    spec = importlib.util.spec_from_file_location("families_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODELS


MODELS = _benchmark_models()


def test_benchmark_runs_every_acceptance_model():
    assert set(MODELS) == set(ACCEPTANCE)


@pytest.mark.parametrize("model", sorted(ACCEPTANCE))
def test_inspect_needs_no_recipe(run_cli, model):
    recipe, layout, prefix, count = ACCEPTANCE[model]
    result = run_cli("inspect", model, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["recipe"] == recipe and data["count"] == count
    assert {s["layout"] for s in data["sites"]} == {layout}
    human = run_cli("inspect", model)
    assert human.code == 0 and recipe in human.stdout
    assert (f"{layout}+{prefix}" if prefix else layout) in human.stdout


def test_inspect_dm_nfnet_needs_no_recipe(run_cli):
    # NFNet-F0: its last feature stage ends at final_conv, so the two deepest hold stages.2 (6
    # blocks) and stages.3 (3 blocks)
    data = json.loads(run_cli("inspect", "dm_nfnet_f0", "--json").stdout)
    assert data["recipe"] == "nfnet" and data["count"] == 9
    assert data["sites"][0]["module"] == "stages.2.0.conv3.sbn"


# one model per layout here; benchmarks/families.py runs all of them. NFNets train with adaptive
# gradient clipping (their paper, timm's recipes): at the default SGD lr the plain NF-ResNet-26
# diverges on digits within one epoch too
@pytest.mark.parametrize("model", ["vit_tiny_patch16_224", "mambaout_femto", "nf_resnet26"])
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_convert_finetune_export_parity_without_a_recipe(run_cli, tmp_path, model):
    recipe, layout, _, _ = ACCEPTANCE[model]
    model_kwargs, train = MODELS[model]
    kwargs = ["--model-kwargs", *model_kwargs] if model_kwargs else []
    ckpt = tmp_path / "sbn.safetensors"
    size = ["--input-size", "3", "64", "64"]
    conv = run_cli("convert", model, "--num-classes", "10", *kwargs, *size, "-o", ckpt, "--json")
    assert conv.code == 0, conv.stderr
    assert json.loads(conv.stdout)["recipe"] == recipe
    run = tmp_path / "run"
    fit = run_cli("finetune", ckpt, "--data", "digits", "--epochs", "1", *train, "-o", run,
                  "--json")
    assert fit.code == 0, fit.stderr
    assert json.loads(fit.stdout)["epochs"] == 1
    onnx_path = tmp_path / "m.onnx"
    exp = run_cli("export", run / "best.safetensors", "-o", onnx_path, "--json")
    assert exp.code == 0, exp.stderr
    data = json.loads(exp.stdout)
    assert data["mode"] == "fold" and data["parity"]["passed"]
    assert {s["map_layout"] for s in data["sites"]} == {layout}
    assert all(s["folded_into"] for s in data["sites"])  # every scale folded into fc2 / conv3
