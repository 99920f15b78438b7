"""SIGTERM (what SLURM and Kubernetes send before preempting a job) behaves as Ctrl-C in every
epoch, the first included: the run stops after the step in progress with a resumable state
holding the partial epoch, and --resume ends where the uninterrupted run ends. Under DDP every
rank stops at the same step, whichever rank got the signal. The signal is raised at a chosen
step (from the progress callback, or a process that waits at that step for it), never after a
sleep, so where it lands does not depend on the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbn_surgery.train import TrainingInterrupted, finetune
from conftest import free_port

TINY = dict(subset=96, batch_size=16, input_size=(3, 32, 32), augment=True)
COMPARED = ("epoch", "loss", "train_top1", "val_loss", "top1", "top5", "lr", "images")
CLI = str(Path(sys.executable).with_name("sbn-surgery"))

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(history):
    return [{k: r[k] for k in COMPARED} for r in history]


def _assert_rows_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in COMPARED:
            if w[k] is None or g[k] is None:
                assert g[k] is w[k], (g["epoch"], k)
            else:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (g["epoch"], k)


def _assert_same_weights(got, want):
    for k, v in want.items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-6, rtol=1e-5), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """The uninterrupted run: resnet10t + recipe resnet, 2 epochs of 6 steps on synthetic data."""
    out = tmp_path_factory.mktemp("ref")
    return finetune("resnet10t", "synthetic", output=out, recipe="resnet", epochs=2, **TINY)


def _sigterm_at(description: str, step: int, times: int = 1):
    def progress(desc, done, total, info=""):
        if desc == description and done == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGTERM)  # to this thread: handled before it returns

    return progress


@pytest.mark.timeout(600)
@pytest.mark.slow
@pytest.mark.parametrize("where, saved_at", [(("epoch 1/2", 2), (0, 2)),
                                             (("epoch 2/2", 3), (1, 3)),
                                             (("val 1/2", 1), (0, 6))],
                         ids=["epoch-1", "mid-epoch-2", "validation"])
def test_sigterm_saves_the_partial_epoch_and_resumes_exactly(tmp_path, reference, where,
                                                             saved_at):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        finetune("resnet10t", "synthetic", output=tmp_path, recipe="resnet", epochs=2,
                 progress=_sigterm_at(*where), **TINY)
    assert info.value.saved and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == saved_at
    resumed = finetune("resnet10t", "synthetic", output=tmp_path, resume=True)
    _assert_rows_close(_rows(resumed.history), _rows(reference.history))
    _assert_same_weights(resumed.model.state_dict(), reference.model.state_dict())


@pytest.mark.timeout(300)
def test_a_second_sigterm_stops_at_once_and_still_saves(tmp_path):
    """Two signals in one step: the second interrupts the step itself; a lone process still
    writes a resumable state (the partial epoch up to the last finished step)."""
    with pytest.raises(TrainingInterrupted) as info:
        finetune("resnet10t", "synthetic", output=tmp_path, recipe="resnet", epochs=1,
                 progress=_sigterm_at("epoch 1/1", 1, times=2), subset=32, batch_size=16,
                 input_size=(3, 32, 32))
    assert info.value.saved and info.value.signum == signal.SIGTERM
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 1)


# ============================================================================================
# the installed command, signalled from outside, with loader workers
# ============================================================================================
#: The CLI, with a hook (in this test only) that waits after step HOLD_STEP of epoch 1 until a
#: stop signal has reached the process: the test sends SIGTERM once it sees HOLD_READY.
HELD_CLI = """
import os, sys, time
from pathlib import Path
import sbn_surgery.train.loop as L

ready, step = Path(os.environ["HOLD_READY"]), int(os.environ["HOLD_STEP"])
original = L._Run._forward_backward

def held(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if self.epoch == 0 and self.step + 1 == step and not ready.exists():
        ready.write_text(str(os.getpid()))
        while not self.stop.set:  # until the test's SIGTERM arrives
            time.sleep(0.01)
    return out

L._Run._forward_backward = held
from sbn_surgery_cli.app import main
sys.argv = ["sbn-surgery", *sys.argv[1:]]
main()
"""
RUN = ["finetune", "resnet10t", "--data", "synthetic", "--recipe", "resnet", "--epochs", "2",
       "--subset", "64", "--batch-size", "16", "--input-size", "3", "32", "32",
       "--workers", "1", "--json"]


def _env() -> dict[str, str]:
    return dict(os.environ, COLUMNS="80", OMP_NUM_THREADS="1")


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists():  # the run writes it at the step it waits in; bounded by the timeout
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its step: {proc.stderr.read()}")
        time.sleep(0.05)


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_sigterm_to_the_process_group_from_outside(tmp_path):
    """SIGTERM to every process of the job (as SLURM sends it), DataLoader workers included:
    exit 143 with one 'interrupted' line, the state of epoch 1 step 2, and --resume ends as the
    uninterrupted run does."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    env = dict(_env(), HOLD_READY=str(ready), HOLD_STEP="2")
    proc = subprocess.Popen([sys.executable, "-c", HELD_CLI, *RUN, "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(ready, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "interrupted" in ln]
    assert len(lines) == 1 and "epoch 1, after batch 2: state saved" in lines[0], err
    assert "Traceback" not in err
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    resumed = subprocess.run([CLI, *RUN, "-o", str(out), "--resume"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    full = subprocess.run([CLI, *RUN, "-o", str(tmp_path / "full")], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    def rows(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    _assert_rows_close(rows(out), rows(tmp_path / "full"))


# ============================================================================================
# DDP: whichever rank gets the signal, all stop at the same step
# ============================================================================================
def _ddp_worker(rank: int, world: int, port: int, root: str, phase: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sbn_surgery.train import loop as L

    if phase == "run-stop" and rank == 1:  # only rank 1 is signalled, after its step 2
        original = L._Run._forward_backward

        def signalled(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if self.epoch == 0 and self.step + 1 == 2:
                signal.raise_signal(signal.SIGTERM)
            return out

        L._Run._forward_backward = signalled
    out = Path(root) / phase.split("-")[0]
    kw = dict(recipe="resnet", epochs=1, subset=64, batch_size=8, input_size=(3, 32, 32),
              device="cpu")
    if phase == "run-stop":
        try:
            finetune("resnet10t", "synthetic", output=out, **kw)
        except TrainingInterrupted as stop:
            (Path(root) / f"stopped{rank}.json").write_text(json.dumps([stop.epoch, stop.step]))
            return
        raise AssertionError("the run was not interrupted")
    if phase == "run-resume":
        r = finetune("resnet10t", "synthetic", output=out, resume=True, device="cpu")
    else:
        r = finetune("resnet10t", "synthetic", output=out, **kw)
    torch.save(r.model.state_dict(), Path(root) / f"{phase}{rank}.pt")


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_ddp_ranks_agree_on_the_step_a_sigterm_stops_at(tmp_path):
    import torch.multiprocessing as mp

    for phase in ("full", "run-stop", "run-resume"):
        mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), phase), nprocs=2, join=True)
    stops = [json.loads((tmp_path / f"stopped{r}.json").read_text()) for r in range(2)]
    assert stops == [[0, 2], [0, 2]]  # rank 0 was not signalled, and stopped at rank 1's step
    full = torch.load(tmp_path / "full0.pt", weights_only=True)
    for rank in range(2):
        _assert_same_weights(torch.load(tmp_path / f"run-resume{rank}.pt", weights_only=True),
                             full)


# ============================================================================================
# DataLoader workers: outlive a SIGTERM while the main process finishes its step, never forever
# ============================================================================================
CFG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0,
       "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _loader_workers(running: bool = False) -> list[int]:
    """This process's DataLoader worker processes (``running``: not those that exited and wait
    to be reaped)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        state, parent = fields.split()[:2]
        if int(parent) == os.getpid() and name == "pt_data_worker" and not (
                running and state in "ZX"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ and val/ of 2 classes x 48 small PNGs: a source read by loader workers (the
    built-in in-memory sources need none)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(48):
                Image.fromarray(np.full((8, 8, 3), 40 * i % 256, np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


@pytest.mark.timeout(120)
def test_a_loader_worker_goes_on_serving_after_a_sigterm(image_folder):
    """As a scheduler signals every process of a job: the worker still makes every batch the
    main process asks for (more than it had made ahead) until the main process ends it."""
    from sbn_surgery.data import build_loaders

    before = set(_loader_workers())  # another test's loader may still have a worker alive
    train, _, _ = build_loaders(str(image_folder), CFG, 8, workers=1)
    batches = train.iter_epoch(0)
    got = [next(batches)]
    workers = [pid for pid in _loader_workers() if pid not in before]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGTERM)
    got += list(batches)  # 11 more batches; at most 2 were made ahead of the signal
    assert len(got) == 12


@pytest.mark.timeout(120)
def test_an_image_error_in_a_worker_ends_the_worker_while_the_error_is_held(image_folder,
                                                                            tmp_path):
    """The one-line DataError of an unreadable image: the loader's worker is told to end at
    once, not when the garbage collector frees the error (which a caller, here pytest.raises,
    may hold: the worker's error, chained to it, held the loader's iterator, and its worker
    stayed alive)."""
    import shutil

    from sbn_surgery.data import build_loaders
    from sbn_surgery.errors import DataError

    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    before = set(_loader_workers())
    train, _, _ = build_loaders(str(root), CFG, 8, workers=1)
    with pytest.raises(DataError) as info:
        list(train.iter_epoch(0))
    assert "0.png" in str(info.value) and info.value.__context__ is None
    while [pid for pid in _loader_workers(running=True) if pid not in before]:
        time.sleep(0.05)  # it exits once told to; bounded by the timeout, not by a clock


#: Leaves a loader iterator with a live worker to the interpreter's exit, where multiprocessing
#: SIGTERMs its daemonic children and waits for them.
ABANDONED = """
import sys
import sbn_surgery.data.loaders as L
from sbn_surgery.data import build_loaders

L.WORKER_TERM_GRACE_S = 1.0  # the forked worker inherits it
cfg = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0,
       "mean": (0.5,) * 3, "std": (0.5,) * 3}
train, _, _ = build_loaders(sys.argv[1], cfg, 8, workers=1)
ITERATOR = train.iter_epoch(0)
next(ITERATOR)
KEEP = [ITERATOR]  # never closed
"""


@pytest.mark.timeout(180)
def test_an_abandoned_loader_does_not_hold_the_process_at_exit(image_folder):
    res = subprocess.run([sys.executable, "-c", ABANDONED, str(image_folder)],
                         capture_output=True, text=True, timeout=150, env=_env(),
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
