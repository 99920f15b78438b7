"""The matmul DFT path of frequency-mode SBN (dense real basis and separable form) against the
independent float64 numpy reference (tests/sbn_reference.py), gradcheck and the FFT path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbn_surgery import SpectralBatchNorm2d, spectral_batch_norm
from sbn_surgery.layers import matmul
from sbn_reference import directional, sbn as ref_sbn

EPS = 1e-5
SIZES = [(1, 1), (3, 5), (7, 7), (14, 15), (28, 28)]
BATCHES = [2, 3, 5, 8]


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 1.7 + 0.5
    gamma = rng.uniform(0.5, 1.5, shape[1])
    beta = rng.standard_normal(shape[1]) * 0.3
    return x, gamma, beta


def _layer(c, hw, gamma, beta, impl="matmul", dtype=torch.float64):
    layer = SpectralBatchNorm2d(c, stats="frequency", impl=impl, eps=EPS, spatial_size=hw)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    return layer


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_values_stats_and_gradients_match_reference(size, n, training):
    c, (h, w) = 2, size
    x, gamma, beta = _data((n, c, h, w), seed=n * 1000 + h * 10 + w)
    rng = np.random.default_rng(h * w + n)
    gout = rng.standard_normal(x.shape)
    # Eval: a running variance that is not symmetric under k -> -k, as a user might load.
    mean = None if training else rng.standard_normal((c, h, w)) * 0.3
    var = None if training else rng.uniform(0.5, 3.0, (c, h, w))
    layer = _layer(c, (h, w), gamma, beta).train(training)
    if not training:
        layer.running_mean.copy_(torch.from_numpy(mean))
        layer.running_var.copy_(torch.from_numpy(var))
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)
    (y * torch.from_numpy(gout)).sum().backward()
    ry, rmean, rvar = ref_sbn(x, gamma, beta, EPS, "frequency", mean=mean, var=var)
    assert np.max(np.abs(y.detach().numpy() - ry)) <= 1e-10
    if training:
        assert np.max(np.abs(layer.running_mean.numpy() - 0.1 * rmean)) <= 1e-10
        unbiased = rvar * n / (n - 1)
        assert np.max(np.abs(layer.running_var.numpy() - (0.9 + 0.1 * unbiased))) <= 1e-10

    def loss(xv=x, gv=gamma, bv=beta):
        return np.sum(ref_sbn(xv, gv, bv, EPS, "frequency", mean=mean, var=var)[0] * gout)

    for k in range(3):  # <grad x, v> along random directions
        v = np.random.default_rng(k).standard_normal(x.shape)
        want = directional(lambda z: loss(xv=z), x, v)
        assert abs(float(np.sum(xt.grad.numpy() * v)) - want) <= 1e-9 * max(1.0, abs(want))
    for i in range(c):
        e = np.eye(c)[i]
        assert abs(float(layer.weight.grad[i]) - directional(lambda z: loss(gv=z), gamma, e)) \
            <= 1e-9
        assert abs(float(layer.bias.grad[i]) - directional(lambda z: loss(bv=z), beta, e)) <= 1e-9


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (5, 1), (3, 5), (4, 4), (7, 7), (6, 5), (12, 12)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_real_basis_is_orthogonal_and_carries_numpys_spectrum(size):
    h, w = size
    q, rep, full, m = matmul._real_basis(h, w)
    assert torch.allclose(q.t() @ q, torch.eye(h * w, dtype=torch.float64), atol=1e-13, rtol=0)
    x = np.random.default_rng(0).standard_normal((3, h, w))
    z = (torch.from_numpy(x).reshape(3, h * w) @ q).numpy()
    spec = np.fft.fft2(x, norm="ortho").reshape(3, h * w)
    p = (h * w - m) // 2
    rep = rep.numpy()
    assert np.allclose(z[:, :m], spec[:, rep[:m]].real, atol=1e-13)
    assert np.allclose(z[:, m:m + p], np.sqrt(2) * spec[:, rep[m:m + p]].real, atol=1e-13)
    assert np.allclose(z[:, m + p:], np.sqrt(2) * spec[:, rep[m + p:]].imag, atol=1e-13)
    # |X(k)|^2 of every full-spectrum bin is the pair mean of its coefficient's square.
    power = matmul._pair_mean(torch.from_numpy(z ** 2), m).numpy()
    assert np.allclose(power[:, full.numpy()], np.abs(spec) ** 2, atol=1e-13)


@pytest.mark.parametrize("size", [(4, 4), (7, 7), (10, 11), (12, 12)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_and_separable_forms_agree(monkeypatch, size, training):
    # Either side of the crossover both forms must give the same values and gradients.
    torch.manual_seed(size[0])
    x = torch.randn(5, 3, *size, dtype=torch.float64) * 2 + 0.7
    gy = torch.randn_like(x)
    got = []
    for dense_max in (10**6, 0):
        monkeypatch.setattr(matmul, "DENSE_MAX_PIXELS", dense_max)
        layer = SpectralBatchNorm2d(3, stats="frequency", impl="matmul", spatial_size=size)
        layer = layer.double().train(training)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(0))
            layer.bias.normal_(generator=torch.Generator().manual_seed(1))
            layer.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(3))
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(gy)
        got.append([y.detach(), xi.grad, layer.weight.grad, layer.bias.grad,
                    layer.running_mean, layer.running_var])
    for a, b in zip(*got):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (2, 2, 3, 5), (3, 1, 13, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_both_forms(shape):
    # 4x4 and 3x5 take the dense form, 13x12 (156 pixels) the separable one.
    assert (shape[2] * shape[3] <= matmul.DENSE_MAX_PIXELS) == (shape[2] < 13)
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(c, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return spectral_batch_norm(x, None, None, w, b, training=True, stats="frequency",
                                   impl="matmul")

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [(4, 4), (14, 15)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_half_inputs_compute_in_float32(dtype, size):
    torch.manual_seed(2)
    x = (torch.randn(6, 3, *size) * 2 + 1).to(dtype)
    gy = torch.randn(6, 3, *size).to(dtype)
    layer = SpectralBatchNorm2d(3, stats="frequency", impl="matmul")
    ref = SpectralBatchNorm2d(3, stats="frequency", impl="matmul")
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    y.backward(gy)
    xr = x.float().requires_grad_(True)
    yr = ref(xr)
    yr.backward(gy.float())
    assert y.dtype == dtype and xi.grad.dtype == dtype
    assert layer.running_var.dtype == torch.float32
    # The statistics are the float32 computation's exactly; outputs differ by one rounding.
    assert torch.equal(layer.running_mean, ref.running_mean)
    assert torch.equal(layer.running_var, ref.running_var)
    assert torch.equal(y, yr.to(dtype))
    assert torch.equal(xi.grad, xr.grad.to(dtype))


@pytest.mark.parametrize("size", [(4, 4), (14, 15)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_gives_the_same_numbers(size, training):
    torch.manual_seed(3)
    x = torch.randn(4, 3, *size, dtype=torch.float64)
    gy = torch.randn_like(x)
    out = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = SpectralBatchNorm2d(3, stats="frequency", impl="matmul", spatial_size=size)
        layer = layer.double().train(training)
        xi = x.clone(memory_format=fmt).requires_grad_(True)
        y = layer(xi)
        y.backward(gy.contiguous(memory_format=fmt))
        if fmt is torch.channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
        out.append((y.detach(), xi.grad, layer.running_var))
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_per_bin_factors_broadcast_over_the_batch_only():
    # A zero stride inside a sample made every spectrum product run on H-element pieces.
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    p = matmul._pairs(t)
    assert p.shape == (2, 1, 3, 2, 4) and p.is_contiguous()
    assert torch.equal(p[:, 0, :, 0], t) and torch.equal(p[:, 0, :, 1], t)


@pytest.mark.parametrize("size", [(4, 4), (13, 12)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_compile_and_export_trace_both_forms(size):
    torch.manual_seed(4)
    layer = SpectralBatchNorm2d(3, stats="frequency", impl="matmul", spatial_size=size)
    x = torch.randn(4, 3, *size)
    for training in (True, False):
        assert torch.export.export(layer.train(training), (x,)) is not None
    ref = SpectralBatchNorm2d(3, stats="frequency", impl="matmul", spatial_size=size).train()
    compiled = torch.compile(layer.train(), backend="eager")
    xi, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, yr = compiled(xi), ref(xr)
    assert torch.allclose(y, yr, atol=1e-6)
    y.square().sum().backward()
    yr.square().sum().backward()
    assert torch.allclose(xi.grad, xr.grad, atol=1e-5)
