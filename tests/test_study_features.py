"""study's feature-map measures (the paper's claims 2 and 3): the figures against a hand
computation, where an arm without SBN is measured, their pairing, and finetune's on_epoch hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sbn_surgery.recipe import Recipe
from sbn_surgery.study.features import (FIGURES, measure, over_sites, probe_images, run_figures,
                                        site_paths)
from sbn_surgery.study.report import _feature_differences
from sbn_surgery.study.stats import T975, direction, t_quantile

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(nn.Module):
    """x -> BatchNorm -> 1x1 conv: the BatchNorm's output is the feature map the sites see."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


A = np.array([1.0, -1.0, 2.0, -2.0])  # one amplitude per image: mean 0, mean square 2.5


def _images() -> torch.Tensor:
    """Image n, channel 0: A[n] cos(pi h / 2) (varies along H); channel 1: the same along W.
    Each map's spectrum holds two components of equal energy, (+-1, 0) or (0, +-1)."""
    wave = np.cos(np.pi / 2 * np.arange(4))
    x = np.zeros((4, 2, 4, 4))
    x[:, 0] = A[:, None, None] * wave[None, :, None]
    x[:, 1] = A[:, None, None] * wave[None, None, :]
    return torch.tensor(x, dtype=torch.float32)


def _reference(x: np.ndarray, eps: float = 1e-5) -> dict[str, float]:
    """BatchNorm on batch statistics (gamma 1, beta 0), then the figures, in float64 numpy."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    power = np.abs(np.fft.fft2(y, norm="ortho")) ** 2  # per (image, channel) map
    p = power.reshape(y.shape[0] * y.shape[1], -1)
    p = p / p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1) / np.log(16)
    return {"max_abs": float(np.abs(y).max()), "rms": float(np.sqrt((y ** 2).mean())),
            "spectral_entropy": float(ent.mean()), "top_freq_share": float(p.max(axis=1).mean())}


def _recipe(rule: str, position: str) -> Recipe:
    return Recipe.from_yaml_text(f"name: toy\nrules:\n  - {rule}\n    position: {position}\n")


@pytest.mark.parametrize("rule, position, site", [
    ("types: [BatchNorm2d]", "after", "bn.sbn"),
    ("types: [Conv2d]", "before", "conv.sbn"),
    ("types: [BatchNorm2d]", "replace", "bn"),
])
def test_a_model_without_sbn_is_measured_where_the_recipe_puts_it(rule, position, site):
    x = _images()
    ref = _reference(x.double().numpy())
    # by hand: var = 2.5 / 2 per channel, so max |y| = 2 / sqrt(1.25); two equal components of
    # 16: entropy log(2) / log(16) = 1/4, top share 1/2
    assert ref["max_abs"] == pytest.approx(2 / math.sqrt(1.25 + 1e-5))
    assert ref["spectral_entropy"] == pytest.approx(0.25) and ref["top_freq_share"] == 0.5
    net = Toy()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    row = measure(net, [x], 3, recipe=_recipe(rule, position), input_size=(2, 4, 4))
    assert row["epoch"] == 3 and [s["module"] for s in row["sites"]] == [site]
    assert row["sites"][0]["shape"] == [2, 4, 4]
    for key, value in ref.items():
        assert row[key] == pytest.approx(value, rel=1e-5), key
        assert row["sites"][0][key] == row[key]
    assert site_paths(net) == []  # the model itself got no SBN, and kept its statistics
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_an_sbn_arm_is_measured_at_its_sbn_output():
    from sbn_surgery.surgery import apply_recipe

    net = Toy()
    apply_recipe(net, _recipe("types: [BatchNorm2d]", "after"), input_size=(2, 4, 4))
    with torch.no_grad():
        net.bn.sbn.weight.fill_(3.0)
    x = _images()
    ref = _reference(x.double().numpy())
    rng = torch.get_rng_state()
    row = measure(net, [x], 0)
    assert torch.equal(torch.get_rng_state(), rng)
    # channel-mode SBN on the BN output (mean 0, mean square v = 1.25 / (1.25 + eps)) on batch
    # statistics scales it by gamma / sqrt(v + eps): max |x| and RMS x3, the spectrum's shape kept
    v = 1.25 / (1.25 + 1e-5)
    scale = 3 / math.sqrt(v + 1e-5)
    assert [s["module"] for s in row["sites"]] == ["bn.sbn"]
    assert row["max_abs"] == pytest.approx(scale * ref["max_abs"], rel=1e-5)
    assert row["rms"] == pytest.approx(scale * ref["rms"], rel=1e-5)
    assert row["spectral_entropy"] == pytest.approx(ref["spectral_entropy"], rel=1e-5)
    with pytest.raises(ValueError, match="recipe"):
        measure(Toy(), [x], 0)  # no SBN and no recipe: nowhere to measure


def test_a_no_bn_arm_is_measured_at_the_recipe_sites_without_its_batchnorm():
    from sbn_surgery.study.arms import build_arm_model, parse_arm

    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    net = build_arm_model(parse_arm("none+remove-bn"), "test_resnet", seed=0, num_classes=10,
                          checkpoint=None, model_kwargs=None, input_size=(3, 16, 16),
                          calibration=calib, force=True)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    row = measure(net, [x], 0, recipe=parse_arm("resnet").recipe, input_size=(3, 16, 16))
    hosts = [s["module"].removesuffix(".sbn") for s in row["sites"]]
    assert hosts == ["layer3.0.bn3", "layer4.0.bn2"]  # resnet's sites: each block's last norm
    seen = {}
    handles = [net.get_submodule(h).register_forward_hook(
        lambda m, a, out, h=h: seen.__setitem__(h, out.abs().max().item())) for h in hosts]
    with torch.no_grad():
        net.eval()(x)  # no BatchNorm left: the host passes its input on, in any mode
    for h in handles:
        h.remove()
    assert seen[hosts[0]] > 0  # without BN, timm's zero-init gamma no longer zeroes the branch
    assert [s["max_abs"] for s in row["sites"]] == pytest.approx([seen[h] for h in hosts])
    assert all(getattr(net.get_submodule(h), "_sbn_no_norm", False) for h in hosts)


def test_figures_over_sites_and_over_epochs():
    sites = [{"max_abs": 2.0, "rms": 1.0, "spectral_entropy": 0.5, "top_freq_share": 0.2},
             {"max_abs": 5.0, "rms": 3.0, "spectral_entropy": 0.7, "top_freq_share": 0.4}]
    assert over_sites(sites) == pytest.approx({"max_abs": 5.0, "rms": 2.0,
                                               "spectral_entropy": 0.6, "top_freq_share": 0.3})
    sites[1]["spectral_entropy"] = None  # a 1x1 map has no spectrum: the others' mean
    assert over_sites(sites)["spectral_entropy"] == 0.5
    sites[0]["spectral_entropy"] = None
    assert over_sites(sites)["spectral_entropy"] is None
    sites[1]["rms"] = None  # a non-finite value: no figure rather than a wrong one
    assert over_sites(sites)["rms"] is None and over_sites(sites)["max_abs"] == 5.0
    assert over_sites([])["max_abs"] is None
    rows = {e: {"max_abs": m, "rms": e, "spectral_entropy": 0.1 * e, "top_freq_share": 0.5}
            for e, m in enumerate([9.0, 4.0, 7.0, 5.0])}
    fig = run_figures(rows, 3)
    assert fig == {"max_abs": 5.0, "rms": 3, "spectral_entropy": pytest.approx(0.3),
                   "top_freq_share": 0.5, "max_abs_init": 9.0, "max_abs_peak": 7.0}
    del rows[2]
    assert run_figures(rows, 3)["max_abs_peak"] is None and run_figures(rows, 3)["rms"] == 3


class _Run:
    def __init__(self, max_abs: list[float], entropy: float) -> None:
        self.features = {e: {"max_abs": m, "rms": 1.0, "spectral_entropy": entropy,
                             "top_freq_share": 0.5} for e, m in enumerate(max_abs)}


def test_feature_differences_are_paired_over_seeds():
    # max |x| after epoch 2 by seed: arm 3, 4, 8; none 4, 6, 11: differences -1, -2, -3
    arm = [_Run([1.0, 2.0, 3.0], 0.80), _Run([1.0, 5.0, 4.0], 0.82), _Run([1.0, 9.0, 8.0], 0.81)]
    base = [_Run([1.0, 5.0, 4.0], 0.70), _Run([1.0, 6.0, 6.0], 0.70), _Run([1.0, 12.0, 11.0],
                                                                            0.72)]
    diffs = _feature_differences(arm, base, 2)
    assert set(diffs) == set(FIGURES)
    assert t_quantile(2) == pytest.approx(T975[1], abs=1e-3)  # t(0.975, 2) = 4.303
    half = t_quantile(2) * 1.0 / math.sqrt(3)  # the sample std of (-1, -2, -3) is 1
    assert diffs["max_abs"]["mean"] == pytest.approx(-2.0)
    assert diffs["max_abs"]["ci95"] == pytest.approx([-2.0 - half, -2.0 + half])
    assert diffs["max_abs"]["direction"] == direction([-2.0 - half, -2.0 + half], 3)
    # peak over epochs 1..2: arm 3, 5, 9; none 5, 6, 12: differences -2, -1, -3
    assert diffs["max_abs_peak"]["mean"] == pytest.approx(-2.0)
    # entropy: +0.10, +0.12, +0.09, all above 0 by more than the interval's half width
    assert diffs["spectral_entropy"]["mean"] == pytest.approx(0.31 / 3)
    assert diffs["spectral_entropy"]["direction"] == "higher"
    assert diffs["max_abs_init"]["mean"] == 0 and diffs["rms"]["ci95"] == [0, 0]
    del arm[1].features[1]  # a missing epoch leaves the peak without a value, not a wrong one
    assert _feature_differences(arm, base, 2)["max_abs_peak"] is None
    assert direction([-3, -1], 3) == "lower" and direction([-1, 1], 3).startswith("no diff")


def test_the_measuring_images_are_fixed_validation_images():
    from sbn_surgery.data import data_config_for, open_source
    from sbn_surgery.models import create_model

    ds = open_source("digits")
    cfg = data_config_for(create_model("test_resnet", num_classes=10), (3, 16, 16), 3)
    first = probe_images(ds, cfg, count=100, batch=32)
    assert [len(x) for x in first] == [32, 32, 32, 4]
    again = probe_images(ds, cfg, count=100, batch=32)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    val = torch.cat([x for x, _ in __import__("sbn_surgery.data", fromlist=["Loader"]).Loader(
        ds, ds.val, cfg, 512, train=False).iter_epoch(0)])
    picked = torch.cat(first)
    # every image is a validation image, none twice, and not simply the first 100 in order
    assert all((val == img).flatten(1).all(1).any() for img in picked)
    assert len({img.numpy().tobytes() for img in picked}) == 100
    assert not torch.equal(picked, val[:100])
    assert [len(x) for x in probe_images(ds, cfg, count=65, batch=32)] == [32, 32]  # no batch of 1


@pytest.mark.slow
def test_finetune_calls_on_epoch_before_each_epoch_is_saved(tmp_path):
    from sbn_surgery import convert
    from sbn_surgery.train import TrainingInterrupted, finetune

    def run(out, calls, progress=None, resume=False):
        torch.manual_seed(0)
        net, _ = convert("test_resnet", "resnet", num_classes=10, input_size=(3, 16, 16),
                         force=True)
        return finetune(net, "digits", output=out, epochs=2, subset=48, batch_size=16,
                        input_size=(3, 16, 16), device="cpu", resume=resume, overwrite=not resume,
                        progress=progress,
                        on_epoch=lambda m, e: calls.append((e, (tmp_path / out / "metrics.jsonl")
                                                            .read_text().count("\n"),
                                                            m.conv1[0].weight.sum().item())))

    whole: list = []
    run(tmp_path / "a", whole)
    # epochs 1 and 2, each before its line in metrics.jsonl is written (0 and 1 lines there)
    assert [(e, lines) for e, lines, _ in whole] == [(1, 0), (2, 1)]

    def stop(desc, done, total, info=""):
        if desc == "epoch 2/2" and done == 1:
            raise KeyboardInterrupt

    parts: list = []
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "b", parts, stop)
    run(tmp_path / "b", parts, resume=True)
    assert [e for e, _, _ in parts] == [1, 2]
    assert [w for _, _, w in parts] == [w for _, _, w in whole]  # the same model at each call


def _ddp_study_worker(rank: int, world: int, port: int, root: str) -> None:
    import json
    import os
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import sbn_surgery.study.setup as S
    from sbn_surgery.study import study

    calls = []
    real = S.StudySetup.measure

    def spy(self, net, epoch):
        calls.append(epoch)
        return real(self, net, epoch)

    S.StudySetup.measure = spy
    study("test_resnet", "synthetic", arms=["none", "resnet"], seeds=2, output=Path(root) / "s",
          subset=32, batch_size=8, input_size=(3, 16, 16), epochs=1, device="cpu", force=True)
    (Path(root) / f"calls{rank}.json").write_text(json.dumps(calls))


@pytest.mark.slow
def test_under_torchrun_every_rank_measures_each_epoch_and_rank_0_writes(tmp_path):
    import json

    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_ddp_study_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    calls = [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in (0, 1)]
    # rank 0 also measures every run at initialization; after each epoch, every rank measures
    # (at once: a model whose norm layers synchronize needs all ranks in its forward pass)
    assert calls[0] == [0, 1] * 4 and calls[1] == [1] * 4
    doc = json.loads((tmp_path / "s" / "study.json").read_text())
    for arm in ("none", "resnet"):
        assert [[r["epoch"] for r in doc["features"]["runs"][arm][k]] for k in "01"] == [[0, 1]] * 2
