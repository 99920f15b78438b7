"""DistributedDataParallel with 2 gloo processes on a token model (ViT, SBN on tokens with a class
token), with --sync-stats: the ranks' SBN statistics are pooled over the global batch during the
epoch (equal on both ranks before the end-of-epoch averaging), and the runs end identical."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sbn_surgery.train import distributed, finetune

    average = distributed.average_running_stats
    before = {}

    def spy(model, ctx):  # each rank's statistics as they were before the averaging
        before.update({k: v.clone() for k, v in model.state_dict().items()})
        average(model, ctx)

    distributed.average_running_stats = spy
    r = finetune("vit_tiny_patch16_224", "synthetic", output=Path(root) / f"out{rank}",
                 model_kwargs={"img_size": 32, "depth": 4}, epochs=1, subset=64, batch_size=8,
                 input_size=(3, 32, 32), device="cpu", sync_stats=True, workers=0)
    torch.save(r.model.state_dict(), Path(root) / f"rank{rank}.pt")
    torch.save(before, Path(root) / f"local{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_sync_stats_on_tokens(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    stats = [k for k in s0 if ".sbn." in k and k.endswith(("running_mean", "running_var"))]
    assert stats and all(".mlp.fc2.sbn." in k for k in stats)  # the vit recipe's sites
    # pooled over the global batch at every step: the ranks agreed before the averaging
    l0 = torch.load(tmp_path / "local0.pt", weights_only=True)
    l1 = torch.load(tmp_path / "local1.pt", weights_only=True)
    for k in stats:
        assert torch.allclose(l0[k], l1[k], atol=1e-6, rtol=1e-5), k
        assert not torch.allclose(l0[k], torch.zeros_like(l0[k]) if "mean" in k
                                  else torch.ones_like(l0[k]))
