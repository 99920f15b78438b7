"""diagnose on models that hold their maps as tokens or channels-last: the spectral figures of
each block are taken on its 2-D map (the patch grid, prefix tokens left out), against a numpy
FFT of the block outputs laid out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import sbn_surgery as sbn

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(maps: np.ndarray) -> tuple[float, float]:
    """Mean top-frequency share and normalized spectral entropy of (N, C, H, W) maps."""
    shares, entropies = [], []
    for n in range(maps.shape[0]):
        for c in range(maps.shape[1]):
            power = np.abs(np.fft.fft2(maps[n, c], norm="ortho")) ** 2
            p = (power / power.sum()).ravel()
            shares.append(p.max())
            nz = p[p > 0]
            entropies.append(-(nz * np.log(nz)).sum() / np.log(p.size))
    return float(np.mean(shares)), float(np.mean(entropies))


def _by_hand(out: torch.Tensor, layout: str, prefix: int, grid) -> np.ndarray:
    x = out.detach().double().numpy()
    if layout == "tokens":
        x = x[:, prefix:].reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    return x.transpose(0, 3, 1, 2)  # NHWC -> NCHW


@pytest.mark.parametrize("name,kwargs,layout,prefix,grid", [
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 3}, "tokens", 2, (4, 4)),
    ("mambaout_femto", {"depths": (1, 1, 1, 1)}, "nhwc", 0, None),
])
def test_block_figures_are_taken_on_the_map(name, kwargs, layout, prefix, grid):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(3, 3, 64, 64)
    report = sbn.diagnose(model, [x], norm_stats="running")
    outputs = {}
    handles = [model.get_submodule(r.module).register_forward_hook(
        lambda _m, _a, out, key=r.module: outputs.__setitem__(key, out)) for r in report.layers]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    blocks = report.blocks()  # ViT: each block is a feature_info point of its own
    assert len(blocks) >= 3
    for rec in blocks:
        assert rec.layout == layout
        maps = _by_hand(outputs[rec.module], layout, prefix, grid)
        share, entropy = _reference(maps)
        assert rec.top_freq_share == pytest.approx(share, rel=1e-5)
        assert rec.spectral_entropy == pytest.approx(entropy, rel=1e-5)
        # rms over the whole output, prefix tokens included
        whole = outputs[rec.module].detach().double()
        assert rec.rms == pytest.approx(float(whole.square().mean().sqrt()), rel=1e-6)
    assert report.to_json()["layers"][-1]["layout"] == layout


def test_a_converted_token_model_is_diagnosed_with_its_sbn_layers():
    model, plan = sbn.convert("vit_tiny_patch16_224", "vit", num_classes=10,
                              model_kwargs={"img_size": 64, "depth": 4}, input_size=(3, 64, 64))
    reports = sbn.diagnose.compare(model, [torch.randn(4, 3, 64, 64)], variants=("bn", "bn+sbn"))
    assert [r.sbn_layers for r in reports] == [0, plan.count] and plan.count == 2
    for rep in reports:
        assert {r.layout for r in rep.blocks()} == {"tokens"}
        assert all(r.top_freq_share is not None for r in rep.blocks())
