"""SpectralBatchNorm2d against the independent float64 numpy reference (tests/sbn_reference.py)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from sbn_surgery import SpectralBatchNorm2d, spectral_batch_norm
from sbn_reference import complex_step_grad, sbn as ref_sbn

SHAPES = [(2, 3, 1, 1), (4, 2, 7, 7), (3, 3, 5, 6), (2, 2, 14, 15), (8, 2, 4, 4), (5, 2, 3, 5),
          (3, 2, 28, 28)]
PATHS = [("channel", "fft"), ("channel", "closed"), ("frequency", "fft"), ("frequency", "matmul")]
EPS = 1e-5


def _data(shape, seed=0, offset=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 1.7 + offset
    c = shape[1]
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.standard_normal(c) * 0.3
    return x, gamma, beta


def _layer(stats, impl, c, dtype=torch.float64, **kw):
    layer = SpectralBatchNorm2d(c, stats=stats, impl=impl, eps=EPS, **kw).to(dtype)
    return layer


def _set_affine(layer, gamma, beta):
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stats,impl", PATHS)
def test_train_values_and_running_stats_match_reference(shape, stats, impl):
    x, gamma, beta = _data(shape)
    layer = _layer(stats, impl, shape[1]).train()
    _set_affine(layer, gamma, beta)
    y = layer(torch.from_numpy(x))
    ry, rmean, rvar = ref_sbn(x, gamma, beta, EPS, stats)
    assert np.max(np.abs(y.detach().numpy() - ry)) <= 1e-10
    count = shape[0] * shape[2] * shape[3] if stats == "channel" else shape[0]
    exp_mean = 0.1 * rmean
    exp_var = 0.9 * 1.0 + 0.1 * rvar * count / (count - 1)
    assert np.max(np.abs(layer.running_mean.numpy() - exp_mean)) <= 1e-10
    assert np.max(np.abs(layer.running_var.numpy() - exp_var)) <= 1e-10
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stats,impl", PATHS)
def test_eval_values_match_reference(shape, stats, impl):
    x, gamma, beta = _data(shape, seed=1)
    rng = np.random.default_rng(2)
    c, h, w = shape[1:]
    stat_shape = (c,) if stats == "channel" else (c, h, w)
    mean = rng.standard_normal(stat_shape) * 0.2
    var = rng.uniform(0.5, 3.0, stat_shape)
    layer = _layer(stats, impl, c, spatial_size=(h, w)).eval()
    _set_affine(layer, gamma, beta)
    layer.running_mean.copy_(torch.from_numpy(mean))
    layer.running_var.copy_(torch.from_numpy(var))
    y = layer(torch.from_numpy(x))
    ry, _, _ = ref_sbn(x, gamma, beta, EPS, stats, mean=mean, var=var)
    assert np.max(np.abs(y.detach().numpy() - ry)) <= 1e-10


GRAD_SHAPES = [(2, 2, 1, 1), (3, 2, 5, 6), (2, 1, 7, 7), (2, 1, 4, 5)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stats,impl", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_match_complex_step_reference(shape, stats, impl, training):
    x, gamma, beta = _data(shape, seed=3)
    rng = np.random.default_rng(4)
    gout = rng.standard_normal(shape)
    c, h, w = shape[1:]
    stat_shape = (c,) if stats == "channel" else (c, h, w)
    mean = None if training else rng.standard_normal(stat_shape) * 0.2
    var = None if training else rng.uniform(0.5, 3.0, stat_shape)

    layer = _layer(stats, impl, c, spatial_size=(h, w)).train(training)
    _set_affine(layer, gamma, beta)
    if not training:
        layer.running_mean.copy_(torch.from_numpy(mean))
        layer.running_var.copy_(torch.from_numpy(var))
    xt = torch.from_numpy(x).requires_grad_(True)
    (layer(xt) * torch.from_numpy(gout)).sum().backward()

    def loss(xv=x, gv=gamma, bv=beta):
        return np.sum(ref_sbn(xv, gv, bv, EPS, stats, mean=mean, var=var)[0] * gout)

    gx = complex_step_grad(lambda v: loss(xv=v), x)
    gg = complex_step_grad(lambda v: loss(gv=v), gamma)
    gb = complex_step_grad(lambda v: loss(bv=v), beta)
    assert np.max(np.abs(xt.grad.numpy() - gx)) <= 1e-10
    assert np.max(np.abs(layer.weight.grad.numpy() - gg)) <= 1e-10
    assert np.max(np.abs(layer.bias.grad.numpy() - gb)) <= 1e-10


def _float32_train_rel_err(shape, stats, impl, seed, offset=0.5) -> float:
    """Max error of a float32 training forward against the float64 reference run on the same
    (float32-rounded) inputs, relative to the output's scale."""
    x, gamma, beta = _data(shape, seed=seed, offset=offset)
    x32, g32, b32 = x.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32)
    layer = _layer(stats, impl, shape[1], dtype=torch.float32).train()
    _set_affine(layer, g32, b32)
    y = layer(torch.from_numpy(x32))
    ry, _, _ = ref_sbn(x32.astype(np.float64), g32, b32, EPS, stats)
    return np.max(np.abs(y.detach().numpy() - ry)) / np.max(np.abs(ry))


@pytest.mark.parametrize("stats,impl", PATHS)
def test_float32_within_relative_tolerance(stats, impl):
    assert _float32_train_rel_err((4, 3, 14, 15), stats, impl, seed=5) <= 1e-4


@pytest.mark.parametrize("stats,impl", PATHS)
@pytest.mark.slow
def test_gradcheck(stats, impl):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return spectral_batch_norm(x, None, None, w, b, training=True, stats=stats, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    rm = torch.randn(2 if stats == "channel" else (2, 5, 6), dtype=torch.float64) * 0.1
    rv = torch.rand_like(rm) + 0.5

    def fn_eval(x, w, b):
        return spectral_batch_norm(x, rm, rv, w, b, training=False, stats=stats, impl=impl)

    assert torch.autograd.gradcheck(fn_eval, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
def test_closed_form_equals_fft_path(training):
    torch.manual_seed(1)
    x = torch.randn(6, 4, 9, 11, dtype=torch.float64) * 3 + 1
    layers = {impl: _layer("channel", impl, 4) for impl in ("fft", "closed")}
    for layer in layers.values():
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(0))
            layer.bias.normal_(generator=torch.Generator().manual_seed(1))
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
        layer.train(training)
    outs, grads = {}, {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype).view_as(y))).sum().backward()
        outs[impl], grads[impl] = y.detach(), (xi.grad, layer.weight.grad, layer.bias.grad)
    assert torch.allclose(outs["fft"], outs["closed"], rtol=0, atol=1e-12)
    for a, b in zip(grads["fft"], grads["closed"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)
    assert torch.allclose(layers["fft"].running_var, layers["closed"].running_var, atol=1e-12)
    assert torch.allclose(layers["fft"].running_mean, layers["closed"].running_mean, atol=1e-12)


def test_running_stats_bookkeeping_matches_batchnorm_in_1x1_case():
    # At 1x1 the spectrum is the pixel itself, so channel SBN *is* BatchNorm: same outputs and
    # the same running-statistics bookkeeping, including momentum=None (cumulative average).
    for momentum in (0.1, None):
        torch.manual_seed(2)
        bn = nn.BatchNorm2d(3, momentum=momentum).double()
        sbn = SpectralBatchNorm2d(3, momentum=momentum).double()
        for step in range(4):
            x = torch.randn(5, 3, 1, 1, dtype=torch.float64) + step
            assert torch.allclose(bn(x), sbn(x), atol=1e-12)
        assert torch.allclose(bn.running_mean, sbn.running_mean, atol=1e-12)
        assert torch.allclose(bn.running_var, sbn.running_var, atol=1e-12)
        assert int(bn.num_batches_tracked) == int(sbn.num_batches_tracked) == 4
        bn.eval(), sbn.eval()
        x = torch.randn(2, 3, 1, 1, dtype=torch.float64)
        assert torch.allclose(bn(x), sbn(x), atol=1e-12)


def test_cumulative_average_momentum_none():
    torch.manual_seed(3)
    layer = SpectralBatchNorm2d(2, momentum=None).double()
    batches = [torch.randn(4, 2, 5, 5, dtype=torch.float64) + i for i in range(3)]
    means = []
    for xb in batches:
        layer(xb)
        means.append(xb[:, :, 0, 0].mean(0) / 5.0)
    assert torch.allclose(layer.running_mean, torch.stack(means).mean(0), atol=1e-12)


def test_track_running_stats_false_always_uses_batch_stats():
    torch.manual_seed(4)
    layer = SpectralBatchNorm2d(3, track_running_stats=False).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert layer.running_mean is None
    assert torch.allclose(y_train, y_eval)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_half_inputs_compute_statistics_in_float32(dtype, stats):
    torch.manual_seed(5)
    x = torch.randn(4, 3, 8, 8) * 2
    layer32 = SpectralBatchNorm2d(3, stats=stats)
    layer16 = SpectralBatchNorm2d(3, stats=stats)
    ref = layer32(x.to(dtype).float())
    xin = x.to(dtype).requires_grad_(True)
    y = layer16(xin)
    assert y.dtype == dtype
    assert layer16.running_var.dtype == torch.float32
    assert torch.allclose(layer16.running_var, layer32.running_var, atol=1e-6)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert torch.allclose(y.detach().float(), ref.detach(), atol=tol * float(ref.detach().abs().max()))
    y.float().sum().backward()
    assert xin.grad.dtype == dtype


@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_channels_last_in_channels_last_out(stats):
    torch.manual_seed(6)
    x = torch.randn(4, 5, 7, 7)
    layer = SpectralBatchNorm2d(5, stats=stats)
    xr = x.clone().requires_grad_(True)
    ref = layer(xr)
    layer2 = SpectralBatchNorm2d(5, stats=stats)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer2(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, ref, atol=1e-5)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y.backward(gy.contiguous(memory_format=torch.channels_last))
    ref.backward(gy)
    assert torch.allclose(xc.grad, xr.grad, atol=1e-5)


def test_frequency_mode_remembers_spatial_size():
    layer = SpectralBatchNorm2d(2, stats="frequency")
    layer(torch.randn(4, 2, 7, 9))
    assert layer.spatial_size == (7, 9)
    layer.eval()
    with pytest.raises(ValueError, match=r"7x9.*8x8"):
        layer(torch.randn(1, 2, 8, 8))
    fresh = SpectralBatchNorm2d(2, stats="frequency").eval()
    with pytest.raises(ValueError, match="no running statistics"):
        fresh(torch.randn(1, 2, 8, 8))


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 3, 4), r"4-D input.*\(2, 3, 4\)"),
        (torch.randn(2, 4, 5, 5), r"expects 3 channels.*\(2, 4, 5, 5\)"),
        (torch.randint(0, 5, (2, 3, 5, 5)), r"floating-point.*int64"),
        (torch.randn(1, 3, 1, 1), r"more than 1 value.*\(1, 3, 1, 1\)"),
    ],
)
def test_input_errors_state_shapes(x, match):
    layer = SpectralBatchNorm2d(3)
    with pytest.raises(ValueError, match=match):
        layer(x)


def test_frequency_training_with_batch_one_is_an_error():
    with pytest.raises(ValueError, match=r"more than 1 value.*\(1, 3, 4, 4\)"):
        SpectralBatchNorm2d(3, stats="frequency")(torch.randn(1, 3, 4, 4))


def test_closed_impl_rejected_for_frequency_mode():
    with pytest.raises(ValueError, match="closed"):
        SpectralBatchNorm2d(3, stats="frequency", impl="closed")
    with pytest.raises(ValueError, match="matmul"):
        SpectralBatchNorm2d(3, stats="channel", impl="matmul")


def test_auto_takes_the_matmul_dft_for_small_maps_only():
    from sbn_surgery.layers.checks import AUTO_MATMUL_MAX_SIDE, _frequency_impl

    side = AUTO_MATMUL_MAX_SIDE
    assert _frequency_impl("auto", 7, 7) == "matmul"
    assert _frequency_impl("auto", side, 1) == "matmul"
    assert _frequency_impl("auto", 2, side + 1) == "fft"
    assert _frequency_impl("auto", 56, 56) == "fft"
    assert _frequency_impl("fft", 4, 4) == "fft"
    assert _frequency_impl("matmul", 64, 64) == "matmul"


@pytest.mark.parametrize("training", [True, False])
def test_matmul_path_equals_fft_path_at_odd_and_even_sizes(training):
    # The separable form (maps over DENSE_MAX_PIXELS) and the dense one, against the reference
    # path: values, gradients of x, gamma, beta and running statistics.
    for shape in [(2, 3, 1, 1), (3, 2, 3, 5), (6, 2, 7, 7), (4, 2, 14, 15), (2, 2, 28, 28),
                  (8, 1, 12, 9)]:
        torch.manual_seed(shape[2] * 100 + shape[3])
        x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.7
        gy = torch.randn(*shape, dtype=torch.float64)
        got = {}
        for impl in ("fft", "matmul"):
            layer = _layer("frequency", impl, shape[1], spatial_size=shape[2:]).train(training)
            with torch.no_grad():
                layer.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(0))
                layer.bias.normal_(generator=torch.Generator().manual_seed(1))
                layer.running_mean.normal_(generator=torch.Generator().manual_seed(2))
                layer.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(3))
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(gy)
            got[impl] = [y.detach(), xi.grad, layer.weight.grad, layer.bias.grad,
                         layer.running_mean, layer.running_var]
        for a, b in zip(got["fft"], got["matmul"]):
            assert torch.allclose(a, b, rtol=0, atol=1e-11), shape


@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_deepcopy_pickle_state_dict_round_trip(stats):
    torch.manual_seed(7)
    layer = SpectralBatchNorm2d(3, stats=stats, momentum=0.2)
    for _ in range(2):
        layer(torch.randn(4, 3, 6, 5))
    layer.eval()
    x = torch.randn(2, 3, 6, 5)
    y = layer(x)
    assert torch.equal(copy.deepcopy(layer)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), y)
    fresh = SpectralBatchNorm2d(3, stats=stats, momentum=0.2)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.eval()(x), y)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # BatchNorm2d's keys: num_batches_skipped is not saved, so SBN state_dicts stay BN-shaped.
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_extra_repr_shows_mode_eps_momentum():
    r = repr(SpectralBatchNorm2d(8, stats="frequency", eps=1e-3, momentum=0.05))
    assert "stats=frequency" in r and "eps=0.001" in r and "momentum=0.05" in r


@pytest.mark.parametrize("stats,impl", PATHS)
def test_torch_export_and_compile(stats, impl):
    torch.manual_seed(8)
    layer = SpectralBatchNorm2d(3, stats=stats, impl=impl, spatial_size=(6, 6))
    x = torch.randn(4, 3, 6, 6)
    for training in (True, False):
        layer.train(training)
        ep = torch.export.export(copy.deepcopy(layer), (x,))
        ref = copy.deepcopy(layer)  # both update their own running statistics in training
        exported = ep.module()
        assert torch.allclose(exported(x), ref(x), atol=1e-6)
        assert torch.allclose(exported.running_var, ref.running_var, atol=1e-6)
    layer.train()
    ref_layer = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    xi = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y = compiled(xi)
    yr = ref_layer(xr)
    assert torch.allclose(y, yr, atol=1e-6)
    y.square().sum().backward()
    yr.square().sum().backward()
    assert torch.allclose(xi.grad, xr.grad, atol=1e-5)
    assert torch.allclose(layer.running_var, ref_layer.running_var, atol=1e-6)


@pytest.mark.parametrize("impl", ["fft", "matmul"])
@pytest.mark.parametrize("training", [True, False])
def test_float32_frequency_mode_keeps_precision_under_a_large_mean(training, impl):
    # The mean is subtracted before the transform: differencing two large spectra instead
    # (rfft2(x) - rfft2(mean)) loses about 4x more digits at this offset.
    shape = (8, 4, 14, 15)
    worst = 0.0
    for seed in range(3):
        x, gamma, beta = _data(shape, seed=seed, offset=100.0)
        x32 = x.astype(np.float32)
        ry, rmean, rvar = ref_sbn(x32.astype(np.float64), gamma.astype(np.float32),
                                  beta.astype(np.float32), EPS, "frequency")
        layer = _layer("frequency", impl, 4, dtype=torch.float32)
        _set_affine(layer, gamma.astype(np.float32), beta.astype(np.float32))
        if training:
            y = layer.train()(torch.from_numpy(x32))
        else:
            layer.eval()
            layer.running_mean = torch.from_numpy(rmean.astype(np.float32))
            layer.running_var = torch.from_numpy(rvar.astype(np.float32))
            y = layer(torch.from_numpy(x32))
        worst = max(worst, np.max(np.abs(y.detach().numpy() - ry)) / np.max(np.abs(ry)))
    assert worst <= 4e-6


@pytest.mark.parametrize("stats,impl", PATHS)
def test_float32_on_1x1_maps_keeps_precision_under_a_large_mean(stats, impl):
    # At 1x1 channel SBN is BatchNorm: E[x^2] - mu^2 would lose about 5 digits at this offset.
    assert _float32_train_rel_err((16, 4, 1, 1), stats, impl, seed=4, offset=100.0) <= 1e-5


@pytest.mark.parametrize("stats,impl", PATHS)
def test_output_can_be_modified_in_place_like_a_residual_add(stats, impl):
    # timm's blocks do `x += shortcut` on the norm's output; a custom Function may not return a
    # view for that.
    torch.manual_seed(9)
    layer = _layer(stats, impl, 3, dtype=torch.float32)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = layer(x)
    y += 1.0
    y.square().sum().backward()
    ref = _layer(stats, impl, 3, dtype=torch.float32)
    xr = x.detach().clone().requires_grad_(True)
    (ref(xr) + 1.0).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
