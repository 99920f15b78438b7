"""SpectralBatchNorm2d on its three layouts (nchw, nhwc, tokens with prefix tokens): values,
running statistics and gradients against the independent float64 numpy reference applied to the
patch grid, gradcheck, and equality with the NCHW layer on the same map."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from sbn_surgery import SpectralBatchNorm2d
from sbn_reference import directional, sbn as ref_sbn

EPS = 1e-5
N, C, H, W = 4, 3, 5, 6
#: (layout, prefix tokens)
LAYOUTS = [("nchw", 0), ("nhwc", 0), ("tokens", 0), ("tokens", 2)]
IDS = ["nchw", "nhwc", "tokens", "tokens+2prefix"]


def _as_layout(maps, layout, prefix):
    """An NCHW array (numpy or torch, any dtype) laid out as ``layout`` with ``prefix`` (N, P, C)
    in front of the tokens."""
    if layout == "nchw":
        return maps
    nhwc = maps.transpose(0, 2, 3, 1) if isinstance(maps, np.ndarray) else maps.permute(0, 2, 3, 1)
    if layout == "nhwc":
        return nhwc
    tokens = nhwc.reshape(maps.shape[0], -1, maps.shape[1])
    if prefix is None or prefix.shape[1] == 0:
        return tokens
    return np.concatenate([prefix, tokens], 1) if isinstance(maps, np.ndarray) \
        else torch.cat([prefix, tokens], 1)


def _reference(x, layout, p, gamma, beta, stats, mean=None, var=None):
    """numpy float64 (or complex, for the complex step) reference on any layout: the patch grid
    taken out by hand, the reference SBN on it, prefix tokens times gamma / sqrt(v + eps) with v
    the channel variance (channel mode) or its mean over frequencies (frequency mode)."""
    if layout == "nchw":
        maps, prefix = x, None
    elif layout == "nhwc":
        maps, prefix = x.transpose(0, 3, 1, 2), None
    else:
        prefix = x[:, :p]
        maps = x[:, p:].reshape(x.shape[0], H, W, x.shape[2]).transpose(0, 3, 1, 2)
    y, mstat, vstat = ref_sbn(maps, gamma, beta, EPS, stats, mean=mean, var=var)
    v = vstat if stats == "channel" else vstat.reshape(vstat.shape[0], -1).mean(1)
    pre = None if prefix is None else prefix * (gamma / np.sqrt(v + EPS)).reshape(1, 1, -1)
    return _as_layout(y, layout, pre), mstat, vstat


def _data(layout, p, seed):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((N, C, H, W)) * 1.5 + 0.4
    prefix = rng.standard_normal((N, p, C)) * 2.0 + 0.7
    x = _as_layout(maps, layout, prefix)
    return np.ascontiguousarray(x), rng.uniform(0.5, 1.5, C), rng.standard_normal(C) * 0.3


def _layer(layout, p, stats, impl, gamma, beta):
    grid = (H, W) if layout == "tokens" else None
    layer = SpectralBatchNorm2d(C, stats=stats, impl=impl, eps=EPS, layout=layout,
                                prefix_tokens=p, grid=grid).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    return layer


@pytest.mark.parametrize("layout,p", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("stats,impl", [("channel", "auto"), ("channel", "fft"),
                                        ("frequency", "auto"), ("frequency", "fft")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layout_matches_the_reference_on_the_patch_grid(layout, p, stats, impl, training):
    x, gamma, beta = _data(layout, p, seed=len(layout) * 10 + p)
    rng = np.random.default_rng(7)
    gout = rng.standard_normal(x.shape)
    mean = var = None
    if not training:  # running statistics as a user might load them
        shape = (C,) if stats == "channel" else (C, H, W)
        mean, var = rng.standard_normal(shape) * 0.3, rng.uniform(0.5, 3.0, shape)
    layer = _layer(layout, p, stats, impl, gamma, beta).train(training)
    if not training:
        layer.running_mean = torch.from_numpy(mean).clone()
        layer.running_var = torch.from_numpy(var).clone()
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)
    assert y.shape == xt.shape
    (y * torch.from_numpy(gout)).sum().backward()
    ry, rmean, rvar = _reference(x, layout, p, gamma, beta, stats, mean, var)
    assert np.max(np.abs(y.detach().numpy() - ry)) <= 1e-10
    if training:
        assert np.max(np.abs(layer.running_mean.numpy() - 0.1 * rmean)) <= 1e-10
        count = N * H * W if stats == "channel" else N
        want = 0.9 + 0.1 * rvar * count / (count - 1)
        assert np.max(np.abs(layer.running_var.numpy() - want)) <= 1e-10

    def loss(xv=x, gv=gamma, bv=beta):
        return np.sum(_reference(xv, layout, p, gv, bv, stats, mean, var)[0] * gout)

    for k in range(3):
        v = np.random.default_rng(100 + k).standard_normal(x.shape)
        want = directional(lambda z: loss(xv=z), x, v)
        assert abs(float(np.sum(xt.grad.numpy() * v)) - want) <= 1e-9 * max(1.0, abs(want))
    for i in range(C):
        e = np.eye(C)[i]
        assert abs(float(layer.weight.grad[i]) - directional(lambda z: loss(gv=z), gamma, e)) <= 1e-9
        assert abs(float(layer.bias.grad[i]) - directional(lambda z: loss(bv=z), beta, e)) <= 1e-9


@pytest.mark.parametrize("layout,p", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_gradcheck_per_layout(layout, p, stats):
    x, gamma, beta = _data(layout, p, seed=3)
    layer = _layer(layout, p, stats, "auto", gamma, beta)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    xt = torch.from_numpy(x).requires_grad_(True)

    def fn(x, w, b):
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    layer.train()
    assert torch.autograd.gradcheck(fn, (xt, w, b))
    layer.eval()
    assert torch.autograd.gradcheck(fn, (xt, w, b))


@pytest.mark.parametrize("layout,p", LAYOUTS[1:], ids=IDS[1:])
@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_a_laid_out_map_gives_what_the_nchw_layer_gives(layout, p, stats):
    x, gamma, beta = _data("nchw", 0, seed=11)
    prefix = torch.randn(N, p, C, dtype=torch.float64)
    ref = _layer("nchw", 0, stats, "auto", gamma, beta)
    lay = _layer(layout, p, stats, "auto", gamma, beta)
    xn = torch.from_numpy(x).requires_grad_(True)
    xl = _as_layout(xn.detach(), layout, prefix).contiguous().requires_grad_(True)
    g = torch.randn(N, C, H, W, dtype=torch.float64)
    for _ in range(2):  # two training steps, then eval (channel mode: the channels-last closed
        yn, yl = ref(xn), lay(xl)  # form, another order of the same sums: equal to rounding)
        assert torch.allclose(_as_layout(yn, layout, None),
                              yl[:, p:] if layout == "tokens" else yl, rtol=0, atol=1e-13)
    yn.backward(g)
    yl.backward(_as_layout(g, layout, torch.zeros(N, p, C, dtype=torch.float64)))
    assert torch.allclose(_as_layout(xn.grad, layout, None),
                          xl.grad[:, p:] if layout == "tokens" else xl.grad, atol=1e-13)
    assert torch.allclose(ref.weight.grad, lay.weight.grad, atol=1e-13)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ref, name), getattr(lay, name), rtol=0, atol=1e-14), name
    ref.eval(), lay.eval()
    yl = lay(xl)
    assert torch.allclose(_as_layout(ref(xn), layout, None),
                          yl[:, p:] if layout == "tokens" else yl, rtol=0, atol=1e-13)


def test_channel_mode_on_tokens_that_do_not_fill_the_grid_lies_them_on_a_line():
    # dynamic_img_size: at another input size the tokens are another grid; channel mode is the
    # same on any grid with the same pixel count and first pixel
    torch.manual_seed(0)
    layer = SpectralBatchNorm2d(C, layout="tokens", prefix_tokens=1, grid=(H, W)).double()
    ref = SpectralBatchNorm2d(C).double()
    maps = torch.randn(N, C, 7, 4, dtype=torch.float64)
    tokens = _as_layout(maps, "tokens", torch.randn(N, 1, C, dtype=torch.float64))
    y = layer(tokens)
    assert torch.allclose(y[:, 1:], _as_layout(ref(maps), "tokens", None), atol=1e-13)
    assert torch.allclose(layer.running_var, ref.running_var, atol=1e-14)


def test_frequency_mode_on_tokens_refuses_another_grid():
    layer = SpectralBatchNorm2d(C, stats="frequency", layout="tokens", prefix_tokens=1,
                                grid=(H, W))
    with pytest.raises(ValueError, match=r"28 patch tokens.*5x6 grid"):
        layer(torch.randn(N, 1 + 28, C))
    with pytest.raises(ValueError, match="needs the grid"):
        SpectralBatchNorm2d(C, stats="frequency", layout="tokens")


@pytest.mark.parametrize("bad,match", [
    ({"layout": "nwhc"}, "layout must be one of"),
    ({"layout": "nhwc", "prefix_tokens": 1}, "needs layout='tokens'"),
    ({"layout": "tokens", "prefix_tokens": -1}, "prefix_tokens must be"),
    ({"layout": "tokens", "grid": (0, 3)}, "grid must be"),
])
def test_bad_layout_arguments_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SpectralBatchNorm2d(C, **bad)


@pytest.mark.parametrize("layout,shape,match", [
    ("nhwc", (N, H, W, C + 1), r"\(N, H, W, C\) with C = 3"),
    ("nhwc", (N, H * W, C), r"4-D input"),
    ("tokens", (N, C, H, W), r"3-D input"),
    ("tokens", (N, 2, C), r"at least one patch token"),
])
def test_inputs_of_the_wrong_shape_name_the_layout(layout, shape, match):
    p = 2 if shape == (N, 2, C) else 0
    layer = SpectralBatchNorm2d(C, layout=layout, prefix_tokens=p)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*shape))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("layout,p", LAYOUTS, ids=IDS)
def test_state_dict_keys_are_batchnorms_whatever_the_layout(layout, p):
    layer = SpectralBatchNorm2d(C, layout=layout, prefix_tokens=p,
                                grid=(H, W) if layout == "tokens" else None)
    keys = set(torch.nn.BatchNorm2d(C).state_dict())
    assert set(layer.state_dict()) == keys
    again = pickle.loads(pickle.dumps(layer))
    assert (again.layout, again.prefix_tokens, again.grid) == (layer.layout, p, layer.grid)


def test_a_layer_pickled_before_layouts_existed_is_nchw():
    layer = SpectralBatchNorm2d(C)
    state = layer.__dict__.copy()
    for name in ("layout", "prefix_tokens", "grid"):
        del state[name]
    old = SpectralBatchNorm2d.__new__(SpectralBatchNorm2d)
    old.__setstate__(state)
    x = torch.randn(N, C, H, W)
    assert torch.equal(old(x), layer(x))


def test_nhwc_output_stays_channels_last_without_a_copy_of_the_layout():
    layer = SpectralBatchNorm2d(C, layout="nhwc")
    x = torch.randn(N, H, W, C)
    for training in (True, False):
        y = layer.train(training)(x)
        assert y.is_contiguous() and y.shape == x.shape


@pytest.mark.parametrize("layout,p", LAYOUTS[1:], ids=IDS[1:])
def test_half_precision_input_keeps_its_dtype_and_float32_statistics(layout, p):
    x32, gamma, beta = _data(layout, p, seed=5)
    x32 = torch.from_numpy(x32).float()
    ref = _layer(layout, p, "channel", "auto", gamma, beta).float()
    lay = _layer(layout, p, "channel", "auto", gamma, beta).float()
    xb = x32.to(torch.bfloat16).requires_grad_(True)
    y = lay(xb)
    assert y.dtype == torch.bfloat16 and lay.running_var.dtype == torch.float32
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    want = ref(xb.detach().float())  # the same bf16 values, in float32
    assert torch.allclose(y.float(), want, rtol=1e-2, atol=1e-2)
    assert torch.allclose(lay.running_var, ref.running_var, rtol=1e-5)


def test_a_non_contiguous_nhwc_view_is_taken_as_it_lies():
    # an NHWC view of an NCHW tensor (strides of neither layout's contiguous form)
    layer = SpectralBatchNorm2d(C, layout="nhwc").double()
    ref = SpectralBatchNorm2d(C).double()
    maps = torch.randn(N, C, H, W, dtype=torch.float64)
    view = maps[..., ::1].permute(0, 2, 3, 1)[:, :, 1:]  # (N, H, W - 1, C), strided
    y = layer(view)
    assert y.shape == view.shape
    assert torch.allclose(y.permute(0, 3, 1, 2), ref(maps[..., 1:]), atol=1e-13)
