"""The SBN export forms (sbn_surgery/export/forms.py) on tensors, and each form through ONNX on a
tiny model, at odd feature sizes (7x7, 14x15) and batch 1 and 3.

References: the DFT matrices against numpy's FFT; the forms against SpectralBatchNorm2d in
float64, whose eval path is itself tested against an independent numpy reference
(test_layers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sbn_surgery import SpectralBatchNorm2d, apply_recipe, calibrate
from sbn_surgery import export_onnx
from sbn_surgery.export.forms import (CornerForm, DftForm, MatmulForm, build_form,
                                      dense_dft_matrices, separable_dft_matrices)
from sbn_surgery.recipe import Recipe

SIZES = [(7, 7), (14, 15), (4, 6), (1, 1), (5, 2)]


def _calibrated_sbn(stats: str, c: int, h: int, w: int, seed: int = 0) -> SpectralBatchNorm2d:
    """An eval-mode SBN with non-trivial running statistics and affine parameters, float64."""
    g = torch.Generator().manual_seed(seed)
    sbn = SpectralBatchNorm2d(c, stats=stats, spatial_size=(h, w), momentum=None).double().train()
    for _ in range(3):
        sbn(torch.randn(4, c, h, w, generator=g, dtype=torch.float64) * 1.7 + 0.4)
    with torch.no_grad():
        sbn.weight.uniform_(0.5, 1.5, generator=g)
        sbn.bias.normal_(0.0, 0.5, generator=g)
    return sbn.eval()


@pytest.mark.parametrize("h,w", SIZES)
def test_dense_dft_matrices_match_numpy(h, w):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, h, w))
    fwd, inv = dense_dft_matrices(h, w)
    spec = x.reshape(3, h * w) @ fwd.numpy()
    ref = np.fft.rfft2(x, norm="ortho")
    wr = w // 2 + 1
    got = spec[:, : h * wr].reshape(3, h, wr) + 1j * spec[:, h * wr:].reshape(3, h, wr)
    assert np.max(np.abs(got - ref)) <= 1e-12
    back = (spec @ inv.numpy()).reshape(3, h, w)
    assert np.max(np.abs(back - x)) <= 1e-12
    # the inverse of an arbitrary half spectrum of a real signal equals numpy's irfft2
    z = np.fft.rfft2(rng.standard_normal((3, h, w)), norm="ortho") * rng.uniform(0.5, 2, (h, wr))
    z = np.fft.rfft2(np.fft.irfft2(z, s=(h, w), norm="ortho"), norm="ortho")  # make it Hermitian
    flat = np.concatenate([z.real.reshape(3, -1), z.imag.reshape(3, -1)], axis=1)
    assert np.max(np.abs(flat @ inv.numpy() - np.fft.irfft2(z, s=(h, w), norm="ortho").reshape(3, -1))) <= 1e-12


@pytest.mark.parametrize("h,w", SIZES)
def test_separable_dft_matrices_match_numpy(h, w):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((h, w))
    m = {k: v.numpy() for k, v in separable_dft_matrices(h, w).items()}
    wr = w // 2 + 1
    z = x @ m["fw"]  # (h, [re, im] x l)
    z = z.reshape(h, 2, wr).transpose(2, 1, 0).reshape(wr, 2 * h) @ m["fh"]  # (l, [re, im] x k)
    got = (z[:, :h] + 1j * z[:, h:]).T
    assert np.max(np.abs(got - np.fft.rfft2(x, norm="ortho"))) <= 1e-12
    y = (z @ m["ih"]).reshape(wr, 2, h).transpose(2, 1, 0).reshape(h, 2 * wr) @ m["iw"]
    assert np.max(np.abs(y - x)) <= 1e-12


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("stats", ["channel", "frequency"])
@pytest.mark.parametrize("mode,layout", [("fold", "auto"), ("dft", "auto"), ("matmul", "dense"),
                                         ("matmul", "separable")])
@pytest.mark.parametrize("batch", [1, 3])
def test_form_equals_layer(h, w, stats, mode, layout, batch):
    sbn = _calibrated_sbn(stats, 5, h, w)
    x = torch.randn(batch, 5, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    ref = sbn(x)
    form = build_form(sbn, "site", mode, (h, w), layout=layout)
    got = form(x.float()).double()
    assert got.shape == ref.shape
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    expected = {"fold": CornerForm if stats == "channel" else MatmulForm, "dft": DftForm,
                "matmul": MatmulForm}[mode]
    assert type(form) is expected


def test_folded_corner_form_keeps_only_the_constant():
    sbn = _calibrated_sbn("channel", 4, 7, 7)
    form = build_form(sbn, "site", "fold", (7, 7), folded=True)
    assert form.scale is None
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    s = (sbn.weight / torch.sqrt(sbn.running_var + sbn.eps)).view(1, -1, 1, 1)
    # folded: the BatchNorm in front already produced s * x
    ref = sbn(x)
    got = form((s * x).float()).double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    # everything but pixel (0, 0) is the scaled input
    assert torch.equal(form(x.float())[..., 1:, :], x.float()[..., 1:, :])


def test_matmul_form_rejects_other_sizes():
    form = build_form(_calibrated_sbn("channel", 3, 7, 7), "layer.sbn", "matmul", (7, 7))
    with pytest.raises(ValueError, match="7x7"):
        form(torch.randn(1, 3, 8, 8))


def test_channel_forms_follow_the_runtime_size():
    """fold and dft forms of a channel-mode layer are size-free: sqrt(H*W) is taken at run time."""
    sbn = _calibrated_sbn("channel", 3, 7, 7)
    for mode in ("fold", "dft"):
        form = build_form(sbn, "s", mode, (7, 7))
        for h, w in [(14, 15), (3, 9)]:
            x = torch.randn(2, 3, h, w, dtype=torch.float64)
            ref = sbn(x)
            assert ((form(x.float()).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-6


# --------------------------------------------------------------------------------------------
# each form through ONNX, on a tiny model (Conv-BN(-SBN)-ReLU-pool-Linear)
# --------------------------------------------------------------------------------------------
def tiny_model(stats: str, size: tuple[int, int], position: str = "after") -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    recipe = Recipe(name="tiny", rules=[{"paths": ["1"], "position": position, "sbn": {"stats": stats}}])
    apply_recipe(model, recipe, input_size=(3, *size))
    g = torch.Generator().manual_seed(0)
    calibrate(model, [torch.randn(4, 3, *size, generator=g) * 2 for _ in range(2)])
    sbn = model[1].sbn
    with torch.no_grad():
        sbn.weight.uniform_(0.5, 1.5, generator=g)
        sbn.bias.normal_(0.0, 0.5, generator=g)
        model[1].weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


@pytest.mark.parametrize("size", [(7, 7), (14, 15)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("stats", ["channel", "frequency"])
@pytest.mark.parametrize("mode", ["fold", "matmul", "dft"])
def test_tiny_model_parity(tmp_path, size, stats, mode):
    model = tiny_model(stats, size)
    result = export_onnx(model, tmp_path / "tiny.onnx", mode=mode, input_size=(3, *size))
    report = result.parity
    assert report.passed
    assert report.top1_agreement == 1.0
    assert report.max_rel_err <= (1e-4 if mode == "dft" else 1e-5)
    runs = sorted((c.source, c.shape) for c in report.cases)
    expected = [("random", (1, 3, *size)), ("random", (3, 3, *size))]
    if result.dynamic_size:  # channel mode, fold and dft: also checked at another size
        expected.insert(0, ("other-size", (3, 3, size[0] + 32, size[1] + 32)))
    assert runs == expected
    assert result.dynamic_size == (stats == "channel" and mode != "matmul")
    site = result.sites[0]
    assert site.spatial_size == size
    assert site.folded_into == ("1" if (mode, stats) == ("fold", "channel") else None)


def test_same_padding_models_default_to_a_fixed_size(tmp_path):
    """TensorFlow-'SAME' padding layers make symbolic-size tracing take minutes, so the automatic
    choice is a fixed size there; the file still matches."""
    from timm.layers import Conv2dSame

    model = tiny_model("channel", (7, 7))
    model[0] = Conv2dSame(3, 6, 3, stride=2)
    result = export_onnx(model, tmp_path / "same.onnx", mode="fold", input_size=(3, 14, 14))
    assert not result.dynamic_size
    assert result.parity.passed
