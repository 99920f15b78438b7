"""DistributedDataParallel with 2 gloo processes: same weights and running statistics on both
ranks at the end, and only rank 0 writes; on a CNN and on a token model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port


#: finetune's arguments per case: a CNN with BatchNorm and SBN after it, and a token model
#: (ViT, SBN on the patch tokens with a class token in front) with --sync-stats
CASES = {
    "resnet": dict(model="resnet10t", recipe="resnet"),
    "tokens": dict(model="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 4},
                   sync_stats=True, workers=0),
}


def _worker(rank: int, world: int, port: int, root: str, case: str = "resnet") -> None:
    # what torchrun sets
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sbn_surgery.train import distributed, finetune

    average = distributed.average_running_stats
    before = {}

    def spy(model, ctx):  # keep each rank's own statistics, as they were before agreeing
        before.update({k: v.clone() for k, v in model.state_dict().items()})
        average(model, ctx)

    distributed.average_running_stats = spy

    out = Path(root) / f"out{rank}"  # each rank gets its own dir: rank 1's must stay empty
    kw = dict(CASES[case])
    r = finetune(kw.pop("model"), "synthetic", output=out, epochs=1, subset=64, batch_size=8,
                 input_size=(3, 32, 32), device="cpu", **kw)
    torch.save(r.model.state_dict(), Path(root) / f"rank{rank}.pt")
    torch.save(before, Path(root) / f"local{rank}.pt")
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(r.to_json()))


pytestmark = pytest.mark.slow  # two processes and several runs: a minute or more


def test_ddp_two_gloo_processes_agree(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    stats = [k for k in s0 if k.endswith(("running_mean", "running_var"))]
    assert any(".sbn." in k for k in stats) and any(".sbn." not in k for k in stats)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # the ranks saw different halves of the data: before agreeing, their statistics differed
    # (BN's and SBN's), while their weights were already identical (DDP's averaged gradients)
    l0 = torch.load(tmp_path / "local0.pt", weights_only=True)
    l1 = torch.load(tmp_path / "local1.pt", weights_only=True)
    for kind in (".sbn.", ".bn1."):
        assert any(not torch.allclose(l0[k], l1[k]) for k in stats if kind in k), kind
    assert all(torch.equal(l0[k], l1[k]) for k in s0 if k.endswith(("weight", "bias")))
    for k in stats:  # and the agreed value is their mean
        assert torch.allclose(s0[k], (l0[k].double() + l1[k].double()).div(2).to(s0[k].dtype))
    # both ranks report the same (all-reduced) validation figures; only rank 0 wrote files
    j0 = json.loads((tmp_path / "rank0.json").read_text())
    j1 = json.loads((tmp_path / "rank1.json").read_text())
    assert j0["val_top1"] == j1["val_top1"] and j0["val_loss"] == j1["val_loss"]
    assert (tmp_path / "out0" / "last.safetensors").is_file()
    assert (tmp_path / "out0" / "metrics.jsonl").read_text().count("\n") == 1
    assert not (tmp_path / "out1").exists() or not any((tmp_path / "out1").iterdir())


@pytest.mark.timeout(900)
def test_ddp_sync_stats_on_tokens(tmp_path):
    """A token model with --sync-stats: the ranks' SBN statistics are pooled over the global
    batch during the epoch (equal on both ranks before the end-of-epoch averaging), and the runs
    end identical."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), "tokens"), nprocs=2, join=True)
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


def _interrupt_worker(rank: int, world: int, port: int, root: str, phase: str) -> None:
    import signal

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sbn_surgery.train import TrainingInterrupted, finetune

    def ctrl_c_at_step_2(desc, done, total, info=""):  # rank 0's progress; the stop reaches all
        if desc.startswith("epoch") and done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    out = Path(root) / phase.split("-")[0]
    kw = dict(recipe="resnet", epochs=1, subset=64, batch_size=8, input_size=(3, 32, 32),
              device="cpu")
    if phase == "run-stop":
        try:
            finetune("resnet10t", "synthetic", output=out, progress=ctrl_c_at_step_2, **kw)
        except TrainingInterrupted:
            return
        raise AssertionError("the run was not interrupted")
    if phase == "run-resume":
        r = finetune("resnet10t", "synthetic", output=out, resume=True, device="cpu",
                     keep_state=True)  # the state it ends with is checked below
    else:
        r = finetune("resnet10t", "synthetic", output=out, **kw)
    torch.save(r.model.state_dict(), Path(root) / f"{phase}{rank}.pt")


def test_ddp_resume_after_ctrl_c_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    # each rank's running statistics differ mid-epoch: the saved state keeps every rank's own,
    # so the resumed ranks go on from them and the epoch ends where the uninterrupted one does
    for phase in ("full", "run-stop", "run-resume"):
        mp.spawn(_interrupt_worker, args=(2, free_port(), str(tmp_path), phase), nprocs=2,
                 join=True)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 0 and state["epoch"] == 1  # the resumed run finished the epoch
    full = torch.load(tmp_path / "full0.pt", weights_only=True)
    for rank in range(2):
        resumed = torch.load(tmp_path / f"run-resume{rank}.pt", weights_only=True)
        for k, v in full.items():
            assert torch.allclose(resumed[k].float(), v.float(), atol=1e-6, rtol=1e-5), k
