"""diagnose: feature-map figures per depth, BatchNorm removal, the paper's trends, the CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
from conftest import one_line_error
from torch import nn

import sbn_surgery as sbn
from sbn_surgery.diagnose import (VARIANTS, compare, diagnose, diagnose_variant, feature_stats,
                                  make_variant, plot_rms, probe_points, remove_batchnorm,
                                  rms_figure, spectral_stats)
from sbn_surgery.errors import ModelError, SurgeryError
from sbn_surgery.recipe import Recipe
from sbn_surgery.surgery import synthetic_batches

SIZE = (3, 64, 64)
SMALL = ["--input-size", "3", "64", "64", "--batch-size", "4"]

#: SBN after the last norm of every residual block (bn2 in basic blocks, bn3 in bottlenecks).
EVERY_BLOCK = r"""
name: every-block
description: SBN after the last norm of every residual block
models: ["resnet*"]
sbn: {stats: channel, eps: 1.0e-5, momentum: 0.1, init: standard}
rules:
  - name: last-norm
    types: [BatchNorm2d]
    paths: ['re:layer\d+\.\d+\.bn\d']
    last_in_parent: true
    position: after
"""


def _model(name="resnet34", seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


# --------------------------------------------------------------------------------------------
# figures of one tensor, against an independent float64 numpy reference
# --------------------------------------------------------------------------------------------
def _reference_spectral(x: np.ndarray):
    shares, entropies = [], []
    hw = x.shape[-1] * x.shape[-2]
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            power = np.abs(np.fft.fft2(x[n, c], norm="ortho")) ** 2
            if power.sum() == 0:
                continue
            p = (power / power.sum()).ravel()
            shares.append(p.max())
            nz = p[p > 0]
            entropies.append(-(nz * np.log(nz)).sum() / np.log(hw))
    return float(np.mean(shares)), float(np.mean(entropies)), len(shares)


def test_spectral_stats_match_numpy_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64)
    x[0, 1] = 0.0                       # a dead map: left out of the averages
    x[1, 2] *= 1e6                      # scale must not matter
    x[2, 3] = x[2, 3].abs() + 3.0       # energy concentrated at DC
    share, entropy, maps = spectral_stats(x)
    ref_share, ref_entropy, ref_maps = _reference_spectral(x.numpy())
    assert maps == ref_maps == 11
    assert share == pytest.approx(ref_share, rel=1e-9)
    assert entropy == pytest.approx(ref_entropy, rel=1e-9)
    # float32 input (normalized per map before the FFT) agrees to float32 precision
    share32, entropy32, _ = spectral_stats(x.float())
    assert share32 == pytest.approx(ref_share, rel=1e-5)
    assert entropy32 == pytest.approx(ref_entropy, rel=1e-5)


def test_spectral_stats_extremes():
    const = torch.full((1, 1, 8, 8), 2.5)
    assert spectral_stats(const)[:2] == pytest.approx((1.0, 0.0), abs=1e-6)
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 3, 5] = 1.0           # flat spectrum
    assert spectral_stats(impulse)[:2] == pytest.approx((1 / 64, 1.0), abs=1e-6)
    assert spectral_stats(torch.randn(2, 3, 1, 1)) == (None, None, 0)
    assert spectral_stats(torch.zeros(2, 3, 4, 4)) == (None, None, 0)
    # exploded activations (1e30) do not overflow float32
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    big = spectral_stats(x * 1e30)
    assert big[0] == pytest.approx(spectral_stats(x)[0], rel=1e-5)
    assert big[1] == pytest.approx(spectral_stats(x)[1], rel=1e-5)


def test_feature_stats_rms_and_max_abs():
    x = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    ref = x.double().numpy()
    f = feature_stats(x)
    assert f["rms"] == pytest.approx(float(np.sqrt((ref ** 2).mean())), rel=1e-6)
    assert f["max_abs"] == pytest.approx(float(np.abs(ref).max()), rel=1e-7)
    huge = feature_stats(x * 1e25)       # (1e25)^2 summed would overflow float32
    assert huge["rms"] == pytest.approx(f["rms"] * 1e25, rel=1e-5)
    tokens = feature_stats(torch.ones(2, 5, 8))  # not a feature map: no spectral figures
    assert tokens["rms"] == pytest.approx(1.0) and tokens["spectral_entropy"] is None


# --------------------------------------------------------------------------------------------
# probe points
# --------------------------------------------------------------------------------------------
def test_probe_points_are_the_residual_blocks_in_order():
    pts = probe_points(_model("resnet34"))
    names = [p for p, _, _ in pts]
    expected = ["act1"] + [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3))
                           for b in range(n)]
    assert names == expected
    assert [k for _, k, _ in pts] == ["feature"] + ["block"] * 16
    assert pts[5][2] == "layer2"


def test_probe_points_fill_stages_that_feature_info_skips():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    names = [p for p, _, _ in probe_points(model)]
    every_block = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks)
                   for j in range(len(stage))]
    assert names == every_block      # feature_info lists blocks.0,1,2,4,6 only


def test_probe_points_without_feature_info():
    body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), body)
    assert [p for p, _, _ in probe_points(model)] == ["1.0", "1.1"]


# --------------------------------------------------------------------------------------------
# the measurement
# --------------------------------------------------------------------------------------------
def test_diagnose_leaves_the_model_untouched():
    model = _model("resnet18")
    sbn.apply_recipe(model, "resnet", input_size=SIZE)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules()}
    report = diagnose(model, synthetic_batches(SIZE, 4, 2))
    assert report.variant == "bn+sbn" and report.sbn_layers == 4 and report.samples == 8
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hooks == {n: (len(m._forward_hooks), len(m._forward_pre_hooks))
                     for n, m in model.named_modules()}
    assert [r.depth for r in report.layers] == list(range(17 - 8))  # resnet18: stem + 8 blocks
    assert report.layers[-1].shape == (512, 2, 2)


def test_norm_layers_use_batch_statistics_unless_told_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    x = [100.0 * torch.randn(8, 3, 16, 16)]
    batch = diagnose(model, x, points=["1"]).layers[0]
    running = diagnose(model, x, points=["1"], norm_stats="running").layers[0]
    with torch.no_grad():
        conv_rms = model[0](x[0]).square().mean().sqrt().item()
    # batch statistics: zero mean, unit variance per channel -> RMS 1
    assert batch.rms == pytest.approx(1.0, rel=1e-3)
    # eval mode at init (mean 0, var 1) is nearly the identity
    assert running.rms == pytest.approx(conv_rms / math.sqrt(1 + 1e-5), rel=1e-4)
    assert running.rms > 20


def test_bad_points_and_batches_are_user_errors():
    model = _model("resnet18")
    with pytest.raises(ModelError, match="layer9"):
        diagnose(model, synthetic_batches(SIZE, 2, 1), points=["layer9"])
    with pytest.raises(sbn.SbnSurgeryError, match="at least 2"):
        diagnose(model, [torch.randn(1, *SIZE)])
    with pytest.raises(sbn.SbnSurgeryError, match="image tensor"):
        diagnose(model, [torch.zeros(4, 64, 64, dtype=torch.long)])


# --------------------------------------------------------------------------------------------
# removing BatchNorm, SBN kept
# --------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = timm.layers.BatchNormAct2d(6, act_layer=nn.ReLU)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn3 = nn.SyncBatchNorm(6)

    def forward(self, x):
        return self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))


SBN_AFTER_NORMS = r"""
name: after-norms
rules:
  - types: [BatchNorm2d, BatchNormAct2d]
    paths: [bn1, bn2]
    position: after
"""


def test_remove_batchnorm_keeps_sbn_hosted_by_batchnorms():
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    plan = sbn.apply_recipe(net, Recipe.from_yaml_text(SBN_AFTER_NORMS), input_size=(3, 8, 8))
    assert [s.module for s in plan.sites] == ["bn1.sbn", "bn2.drop.sbn"]
    keys = list(net.state_dict())
    assert remove_batchnorm(net) == 3
    assert remove_batchnorm(net) == 0           # idempotent
    assert list(net.state_dict()) == keys       # modules and their SBN children stay
    net.train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        got = net(x)
        # reference: the same layers by hand, BatchNorm absent, SBN (batch statistics) present
        s1, s2 = net.bn1.sbn, net.bn2.drop.sbn
        ref = lambda h, s: sbn.spectral_batch_norm(h, None, None, s.weight, s.bias,  # noqa: E731
                                                   training=True, impl="fft")
        h = ref(net.conv1(x), s1)
        h = torch.relu(ref(net.conv2(h), s2))
        want = net.conv3(h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert int(s1.num_batches_tracked) == 1 and int(s2.num_batches_tracked) == 1


@pytest.mark.slow
def test_diagnose_records_sbn_output_after_remove_bn():
    # the hook-run SBN still normalizes: block outputs of the converted, BN-free model differ
    # from those of the BN-free model without SBN
    model = _model("resnet18")
    x = synthetic_batches(SIZE, 4, 1)
    plain = diagnose_variant(model, x, remove_bn=True, input_size=SIZE)
    with_sbn = diagnose_variant(model, x, recipe="resnet", remove_bn=True, input_size=SIZE)
    assert plain.variant == "no-bn" and with_sbn.variant == "no-bn+sbn"
    assert with_sbn.sbn_layers == 4
    early = {r.module: r.rms for r in plain.layers}
    for rec in with_sbn.layers:
        if rec.module.startswith(("layer1", "layer2")):
            assert rec.rms == pytest.approx(early[rec.module], rel=1e-5)
    assert with_sbn.layers[-1].rms != pytest.approx(plain.layers[-1].rms, rel=1e-2)


# --------------------------------------------------------------------------------------------
# the paper's trends (the resnet50 figures are in the README; resnet34 at 64 px shows the same)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet34_at_init():
    return _model("resnet34", seed=0), synthetic_batches(SIZE, 8, 1, seed=0)


@pytest.mark.slow
def test_without_bn_feature_maps_explode_and_sbn_stops_it(resnet34_at_init):
    model, x = resnet34_at_init
    no_bn = diagnose_variant(model, x, remove_bn=True, input_size=SIZE)
    deep = diagnose_variant(model, x, recipe="resnet", remove_bn=True, input_size=SIZE)
    every = diagnose_variant(model, x, recipe=Recipe.from_yaml_text(EVERY_BLOCK),
                             remove_bn=True, input_size=SIZE)
    assert deep.sbn_layers == 9 and every.sbn_layers == 16
    # measured (seeds 0-7): no BN 22-38, resnet recipe 3.4-4.8, every block 2.0-2.4
    assert no_bn.growth() >= 10
    assert deep.growth() <= no_bn.growth() / 2
    assert every.growth() <= 4
    # RMS rises block after block without BN: far more often than not
    rms = [r.rms for r in no_bn.blocks()]
    assert sum(b > a for a, b in zip(rms, rms[1:])) >= 0.75 * (len(rms) - 1)


FREQUENCY_AT_ONE_SITE = r"""
name: frequency-one
rules:
  - paths: [layer3.0.bn2]
    sbn: {stats: frequency}
"""

FREQUENCY_EVERY_BLOCK = EVERY_BLOCK.replace("stats: channel", "stats: frequency")


@pytest.mark.slow
def test_frequency_sbn_raises_spectral_entropy_on_the_same_input(resnet34_at_init):
    model, x = resnet34_at_init
    base = make_variant(model, remove_bn=True)
    # one SBN: its input is exactly the BN-free model's output of layer3.0.bn2 (no BN)
    one = make_variant(model, recipe=Recipe.from_yaml_text(FREQUENCY_AT_ONE_SITE), sbn=True,
                       remove_bn=True, input_size=SIZE)
    before = diagnose(base, x, points=["layer3.0.bn2"]).layers[0]
    after = diagnose(one, x, points=["layer3.0.bn2"]).layers[0]  # the hook returns SBN's output
    assert after.spectral_entropy > before.spectral_entropy + 0.1
    assert after.top_freq_share < before.top_freq_share
    # SBN after every block: every block output has a flatter spectrum than without it
    plain = diagnose(base, x)
    spread = diagnose_variant(model, x, recipe=Recipe.from_yaml_text(FREQUENCY_EVERY_BLOCK),
                              remove_bn=True, input_size=SIZE)
    pairs = list(zip(plain.blocks(), spread.blocks()))
    assert all(b.spectral_entropy > a.spectral_entropy for a, b in pairs)


# --------------------------------------------------------------------------------------------
# compare and plot
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18_compared():
    model = _model("resnet18")
    return model, compare(model, synthetic_batches(SIZE, 4, 1), input_size=SIZE)


@pytest.mark.slow
def test_compare_runs_the_four_variants(resnet18_compared):
    model, reports = resnet18_compared
    assert [r.variant for r in reports] == [v[0] for v in VARIANTS]
    assert [r.sbn_layers for r in reports] == [0, 4, 0, 4]
    assert all(r.recipe == "resnet" for r in reports if r.sbn_layers)  # picked by model name
    assert reports[1].label == "BN + SBN (resnet)"
    # the BN variants agree before layer3, where the recipe's first SBN sits
    for a, b in zip(reports[0].layers[:5], reports[1].layers[:5]):
        assert a.rms == pytest.approx(b.rms, rel=1e-6)
    # a converted model: its own SBN layers, stripped for the BN variants; no recipe on top
    converted = copy.deepcopy(model)
    sbn.apply_recipe(converted, Recipe.from_yaml_text(EVERY_BLOCK), input_size=SIZE)
    again = compare(converted, synthetic_batches(SIZE, 4, 1), variants=("bn", "no-bn+sbn"))
    assert [r.sbn_layers for r in again] == [0, 8]
    assert again[1].recipe == "converted"
    with pytest.raises(SurgeryError, match="already has"):
        compare(converted, synthetic_batches(SIZE, 4, 1), recipe="resnet")


@pytest.mark.slow
def test_plot_has_log_rms_axis_labels_and_a_legend(resnet18_compared, tmp_path):
    _, reports = resnet18_compared
    fig = rms_figure(reports, weights="at initialization")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert "RMS" in ax.get_ylabel() and "depth" in ax.get_xlabel()
    assert "resnet18 at initialization" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 4 and legend[2].startswith("no BN, last/first block \u00d7")
    out = tmp_path / "rms.png"
    plot_rms(reports, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rms.png"]  # no temporary file left


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
LAYER_KEYS = {"module", "depth", "rms", "max_abs", "top_freq_share", "spectral_entropy"}


@pytest.mark.slow
def test_cli_json_single_variant(run_cli):
    result = run_cli("diagnose", "resnet18", *SMALL, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18" and data["variant"] == "bn"
    assert len(data["layers"]) == 9 and LAYER_KEYS <= set(data["layers"][0])
    assert [r["depth"] for r in data["layers"]] == list(range(9))
    human = run_cli("diagnose", "resnet18", *SMALL, "--recipe", "resnet", "--remove-bn")
    assert human.code == 0, human.stderr
    assert "no BN + SBN (resnet)" in human.stdout and "layer4.1" in human.stdout
    assert "RMS grows \u00d7" in human.stdout


@pytest.mark.slow
def test_cli_compare_table_json_and_plot(run_cli, tmp_path):
    png = tmp_path / "cmp.png"
    result = run_cli("diagnose", "resnet18", *SMALL, "--compare", "--plot", png, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18"
    assert [v["variant"] for v in data["variants"]] == ["bn", "bn+sbn", "no-bn", "no-bn+sbn"]
    assert all(LAYER_KEYS <= set(v["layers"][0]) for v in data["variants"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    # under --json, no table anywhere: the growth is in the object
    assert "layer4.1" not in result.stderr and "growth" not in result.stderr
    assert all("growth" in v for v in data["variants"])


@pytest.mark.slow
def test_cli_uses_the_given_weights(run_cli, tmp_path):
    model = _model("resnet18", seed=3)
    with torch.no_grad():
        model.layer4[1].bn2.weight.fill_(5.0)  # not timm's zero init
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    x = synthetic_batches(SIZE, 4, 1, seed=0)
    want = diagnose(model, x).layers[-1].rms
    got = json.loads(run_cli("diagnose", "resnet18", "--num-classes", "10", "--checkpoint", path,
                             *SMALL, "--json").stdout)
    assert got["layers"][-1]["rms"] == pytest.approx(want, rel=1e-5)
    # a converted checkpoint brings its SBN layers
    converted, _ = sbn.convert("resnet18", "resnet", num_classes=10, input_size=SIZE)
    conv_path = tmp_path / "r18-sbn.safetensors"
    sbn.save_converted(converted, conv_path)
    data = json.loads(run_cli("diagnose", conv_path, *SMALL, "--json").stdout)
    assert data["variant"] == "bn+sbn" and data["sbn_layers"] == 4


def test_cli_errors_are_one_line(run_cli):
    one_line_error(run_cli("diagnose", "resnet_does_not_exist", "--json"), "resnet_does_not_exist")
    one_line_error(run_cli("diagnose", "resnet18", *SMALL, "--norm-stats", "sometimes"),
                   "--norm-stats")
