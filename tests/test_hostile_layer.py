"""SpectralBatchNorm2d under hostile input: non-finite batches, failing calls, bad state_dicts."""

from __future__ import annotations

import io

import pytest
import torch

from sbn_surgery import SpectralBatchNorm2d

MODES = [("channel", "closed"), ("channel", "fft"), ("frequency", "fft"),
         ("frequency", "matmul")]


def _state_bytes(layer) -> bytes:
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    return buf.getvalue()


def _batches(count, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 2 + 0.5 for _ in range(count)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("stats,impl", MODES)
def test_a_non_finite_batch_does_not_poison_the_running_statistics(stats, impl, momentum, bad):
    shape = (4, 3, 5, 6)
    clean = _batches(50, shape, seed=0)
    poisoned = clean[0].clone()
    poisoned[1, 2, 3, 4] = bad
    layer = SpectralBatchNorm2d(3, stats=stats, impl=impl, momentum=momentum)
    ref = SpectralBatchNorm2d(3, stats=stats, impl=impl, momentum=momentum)
    y = layer(poisoned)
    assert not torch.isfinite(y).all()  # defined numerics: the non-finite statistics' output
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 0
    for xb in clean:
        layer(xb)
        ref(xb)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    # The skipped batch left no trace: the statistics and the count are those of the clean run,
    # so momentum=None still averages over exactly the batches that were taken.
    assert torch.allclose(layer.running_mean, ref.running_mean, rtol=0, atol=1e-6)
    assert torch.allclose(layer.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(layer.num_batches_tracked) == 50 and int(layer.num_batches_skipped) == 1


def test_cumulative_average_skips_the_bad_batch_in_the_middle():
    layer = SpectralBatchNorm2d(2, momentum=None).double()
    xs = [torch.randn(4, 2, 5, 5, dtype=torch.float64) + i for i in range(3)]
    bad = xs[1].clone()
    bad[0, 0, 0, 0] = float("inf")
    for xb in (xs[0], bad, xs[1], xs[2]):
        layer(xb)
    means = torch.stack([xb[:, :, 0, 0].mean(0) / 5.0 for xb in xs])
    assert torch.allclose(layer.running_mean, means.mean(0), atol=1e-12)
    assert int(layer.num_batches_tracked) == 3 and int(layer.num_batches_skipped) == 1


def _failing_calls():
    """(description, layer factory, call): every failure a caller can provoke in forward."""
    def freq():
        return SpectralBatchNorm2d(3, stats="frequency")

    def freq_sized():
        layer = SpectralBatchNorm2d(3, stats="frequency")
        layer(torch.randn(4, 3, 6, 6))
        return layer

    def chan():
        return SpectralBatchNorm2d(3)

    def set_momentum(m):
        m.momentum = 7.0
        return m(torch.randn(4, 3, 6, 6))

    return [
        ("frequency batch 1 at 1x1", freq, lambda m: m(torch.randn(1, 3, 1, 1))),
        ("frequency batch 1", freq_sized, lambda m: m(torch.randn(1, 3, 6, 6))),
        ("frequency empty batch", freq, lambda m: m(torch.randn(0, 3, 6, 6))),
        ("frequency wrong size", freq_sized, lambda m: m(torch.randn(4, 3, 5, 5))),
        ("frequency eval before stats", freq, lambda m: m.eval()(torch.randn(4, 3, 5, 5))),
        ("channel 1 value", chan, lambda m: m(torch.randn(1, 3, 1, 1))),
        ("channel empty batch", chan, lambda m: m(torch.randn(0, 3, 4, 4))),
        ("wrong channel count", freq_sized, lambda m: m(torch.randn(4, 5, 6, 6))),
        ("integer input", chan, lambda m: m(torch.ones(4, 3, 6, 6, dtype=torch.int64))),
        ("complex input", chan, lambda m: m(torch.randn(4, 3, 6, 6, dtype=torch.complex64))),
        ("3-D input", chan, lambda m: m(torch.randn(3, 6, 6))),
        ("empty spatial size", freq, lambda m: m(torch.randn(4, 3, 0, 6))),
        ("momentum out of range", freq_sized, set_momentum),
    ]


@pytest.mark.parametrize("name,make,call", _failing_calls(), ids=[c[0] for c in _failing_calls()])
def test_a_call_that_raises_leaves_the_module_as_it_was(name, make, call):
    layer = make()
    before = _state_bytes(layer)
    size = layer.spatial_size
    with pytest.raises(ValueError):
        call(layer)
    assert _state_bytes(layer) == before
    assert layer.spatial_size == size


def test_frequency_layer_takes_its_real_size_after_a_failed_1x1_call():
    layer = SpectralBatchNorm2d(3, stats="frequency")
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, 3, 1, 1))
    layer(torch.randn(4, 3, 7, 7))
    assert layer.spatial_size == (7, 7)


@pytest.mark.parametrize("stats,impl", MODES)
def test_empty_batch_in_eval_gives_an_empty_output(stats, impl):
    layer = SpectralBatchNorm2d(3, stats=stats, impl=impl, spatial_size=(5, 6)).eval()
    x = torch.randn(0, 3, 5, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 5, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("momentum", [1e9, -0.1, float("nan"), float("inf"), "0.1", True])
def test_momentum_outside_0_1_is_refused(momentum):
    with pytest.raises(ValueError, match="momentum"):
        SpectralBatchNorm2d(3, momentum=momentum)


@pytest.mark.parametrize("kwargs,match", [({"eps": -1e-5}, "eps"), ({"eps": float("nan")}, "eps"),
                                          ({"stats": "frequency", "spatial_size": (0, 4)},
                                           "spatial_size")])
def test_bad_constructor_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralBatchNorm2d(3, **kwargs)


def _trained(stats):
    layer = SpectralBatchNorm2d(3, stats=stats)
    for xb in _batches(2, (4, 3, 5, 6), seed=1):
        layer(xb)
    return layer


def _bad_state_dicts(stats):
    good = _trained(stats).state_dict()
    shape = good["running_var"].shape
    out = []
    wrong = (4,) if stats == "channel" else (4, 5, 6)
    out.append(("wrong channels", {**good, "running_var": torch.ones(wrong)}, "shape"))
    flat = torch.ones(3) if stats == "frequency" else torch.ones(3, 5, 6)
    out.append(("wrong rank", {**good, "running_mean": flat}, "shape"))
    if stats == "frequency":
        out.append(("mean/var sizes differ", {**good, "running_mean": torch.zeros(3, 4, 4)},
                    "must match"))
    nan = good["running_var"].clone()
    nan.view(-1)[0] = float("nan")
    out.append(("nan var", {**good, "running_var": nan}, "non-finite"))
    inf = torch.zeros(shape)
    inf.view(-1)[-1] = float("inf")
    out.append(("inf mean", {**good, "running_mean": inf}, "non-finite"))
    out.append(("negative var", {**good, "running_var": -torch.ones(shape)}, "negative"))
    return out


@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_bad_running_statistics_in_a_state_dict_are_refused_and_change_nothing(stats):
    for name, sd, match in _bad_state_dicts(stats):
        layer = SpectralBatchNorm2d(3, stats=stats)
        before = _state_bytes(layer)
        with pytest.raises(ValueError, match=match):
            layer.load_state_dict(sd)
        assert _state_bytes(layer) == before, name


@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_skip_counter_is_not_saved_and_bn_shaped_state_dicts_load_strictly(stats):
    src = _trained(stats)
    bad = torch.randn(4, 3, 5, 6)
    bad[0, 0, 0, 0] = float("nan")
    src(bad)
    sd = src.state_dict()
    assert "num_batches_skipped" not in sd  # BatchNorm2d's keys, as before the counter existed
    layer = SpectralBatchNorm2d(3, stats=stats)
    result = layer.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.running_var, src.running_var)
    assert int(src.num_batches_skipped) == 1 and int(layer.num_batches_skipped) == 0
    bn = torch.nn.BatchNorm2d(3)
    if stats == "channel":  # an SBN that replaced a BatchNorm loads back into one
        bn.load_state_dict(sd, strict=True)
        assert torch.equal(bn.running_var, src.running_var)


def test_converted_checkpoint_loading_fills_the_counter_and_refuses_bad_statistics():
    # models.load_weights checks keys itself, then load_state_dict: statistics the layer refuses
    # (non-finite) are a CheckpointError naming the file, not a bare ValueError.
    from torch import nn

    from sbn_surgery.errors import CheckpointError
    from sbn_surgery.models import load_weights

    src = nn.Sequential(nn.Conv2d(3, 3, 1), SpectralBatchNorm2d(3, stats="frequency"))
    src(torch.randn(4, 3, 5, 6))
    old = src.state_dict()
    dst = nn.Sequential(nn.Conv2d(3, 3, 1), SpectralBatchNorm2d(3, stats="frequency",
                                                                spatial_size=(5, 6)))
    load_weights(dst, old, source="old.safetensors")
    assert torch.equal(dst[1].running_var, src[1].running_var)
    bad = dict(old, **{"1.running_var": torch.full((3, 5, 6), float("nan"))})
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*non-finite"):
        load_weights(dst, bad, source="bad.safetensors")
