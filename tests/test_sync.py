"""SBN statistics pooled across ranks equal SBN on the whole batch (2 gloo processes)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sbn_surgery.layers import SpectralBatchNorm2d, sync_sbn_stats


def _data(stats, pixel=False):
    """pixel: 1x1 maps; "tokens": 2 prefix tokens and the 5x6 map as tokens (N, 2 + 30, C)."""
    g = torch.Generator().manual_seed(0)
    h, w = (1, 1) if pixel is True else (5, 6)
    x = torch.randn(6, 3, h, w, generator=g, dtype=torch.float64) * 2 + 0.5
    gy = torch.randn(6, 3, h, w, generator=g, dtype=torch.float64)
    kw = {}
    if pixel == "tokens":
        x = torch.cat([torch.randn(6, 2, 3, generator=g, dtype=torch.float64) * 3,
                       x.flatten(2).transpose(1, 2)], 1)
        gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        kw = {"layout": "tokens", "prefix_tokens": 2, "grid": (h, w)}
    layer = SpectralBatchNorm2d(3, stats=stats, momentum=0.3, **kw).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.normal_(generator=g)
    return x, gy, layer


def _worker(rank, world, stats, pixel, out_dir):
    # A file rendezvous: no TCP port to race for with other tests running beside this one.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=world)
    try:
        x, gy, layer = _data(stats, pixel)
        assert sync_sbn_stats(layer) == 1
        part = slice(rank * 3, rank * 3 + 3)
        xr = x[part].clone().requires_grad_(True)
        y = layer(xr)
        y.backward(gy[part])
        wgrad = layer.weight.grad.clone()
        dist.all_reduce(wgrad)  # the sum of the local parameter gradients
        torch.save({"y": y.detach(), "gx": xr.grad, "wgrad": wgrad,
                    "rm": layer.running_mean, "rv": layer.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _precision_worker(rank, world, stats, pixel, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=world)
    try:
        x, _, layer = _data(stats, pixel)
        x, layer = (x + 100.0).float(), layer.float()
        sync_sbn_stats(layer)
        y = layer(x[rank * 3:rank * 3 + 3]).detach()
        torch.save({"y": y, "rv": layer.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stats,pixel", [("frequency", False), ("channel", True)],
                         ids=["frequency", "channel-1x1"])
def test_synced_statistics_keep_float32_precision_under_a_large_mean(stats, pixel, tmp_path):
    # Pooling E|X|^2 and |E X|^2 separately would cancel (at the DC bin; at 1x1 maps, where
    # channel mode is BatchNorm, everywhere): the mean is pooled first.
    mp.spawn(_precision_worker, args=(2, stats, pixel, str(tmp_path)), nprocs=2, join=True)
    x, _, layer = _data(stats, pixel)
    y = layer(x + 100.0).detach()  # float64, whole batch
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    y_got = torch.cat([g["y"] for g in got]).double()
    assert float((y_got - y).abs().max() / y.abs().max()) <= 1e-5
    rv = layer.running_var
    assert float((got[0]["rv"].double() - rv).abs().max() / rv.abs().max()) <= 1e-5


@pytest.mark.parametrize("stats,pixel", [("channel", False), ("frequency", False),
                                         ("channel", True), ("channel", "tokens"),
                                         ("frequency", "tokens")],
                         ids=["channel", "frequency", "channel-1x1", "channel-tokens",
                              "frequency-tokens"])
def test_synced_statistics_equal_whole_batch(stats, pixel, tmp_path):
    mp.spawn(_worker, args=(2, stats, pixel, str(tmp_path)), nprocs=2, join=True)
    x, gy, layer = _data(stats, pixel)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(gy)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        part = slice(rank * 3, rank * 3 + 3)
        assert torch.allclose(got["y"], y.detach()[part], atol=1e-12)
        assert torch.allclose(got["gx"], xr.grad[part], atol=1e-12)
        assert torch.allclose(got["wgrad"], layer.weight.grad, atol=1e-11)
        assert torch.allclose(got["rm"], layer.running_mean, atol=1e-12)
        assert torch.allclose(got["rv"], layer.running_var, atol=1e-12)
