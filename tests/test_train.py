"""Fine-tuning: learning, outputs, resume equivalence, atomic checkpoints, options, CLI errors."""

from __future__ import annotations

import json
import math
import os
import signal
import sys

import pytest
import torch

from sbn_surgery.errors import CheckpointError, DeviceError, SbnSurgeryError
from sbn_surgery.layers import SpectralBatchNorm2d
from sbn_surgery.train import TrainingInterrupted, finetune
from sbn_surgery.train import model as M
from sbn_surgery.train import outputs as O

TINY = dict(subset=96, batch_size=16, input_size=(3, 32, 32), augment=True)
COMPARED = ("epoch", "loss", "train_top1", "val_loss", "top1", "top5", "lr", "images")


def _rows(result):
    return [{k: r[k] for k in COMPARED} for r in result.history]


def _assert_rows_close(got, want, rel=1e-6, abs=1e-7):
    """Per-epoch metrics equal within float tolerance (``None`` where the other is ``None``)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if w[k] is None or g[k] is None:
                assert g[k] is w[k], (g["epoch"], k)
            else:
                assert g[k] == pytest.approx(w[k], rel=rel, abs=abs), (g["epoch"], k)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, one_thread):
    """The uninterrupted reference run: resnet10t + recipe resnet, 2 epochs on synthetic data."""
    out = tmp_path_factory.mktemp("ref")
    return finetune("resnet10t", "synthetic", output=out, recipe="resnet", epochs=2,
                    warmup_epochs=1, keep_state=True, **TINY)  # the lr check below: 1 epoch


def test_loss_decreases_and_outputs_are_written(two_epochs):
    from sbn_surgery.checkpoint import load_converted

    r = two_epochs
    assert r.epochs == 2 and len(r.history) == 2
    assert r.history[1]["loss"] < r.history[0]["loss"]
    assert r.val_top1 == r.history[-1]["top1"] and r.val_loss == r.history[-1]["val_loss"]
    out = r.output
    lines = [json.loads(s) for s in open(f"{out}/metrics.jsonl").read().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    assert {"loss", "val_loss", "top1", "top5", "images_per_s", "lr"} <= set(lines[0])
    assert open(f"{out}/curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    state = torch.load(f"{out}/state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 0 and "optimizer" in state
    # the checkpoints are converted checkpoints of the trained model
    last = load_converted(f"{out}/last.safetensors")
    assert sum(isinstance(m, SpectralBatchNorm2d) for m in last.modules()) >= 2
    ref = r.model.state_dict()
    assert all(torch.equal(v, ref[k].cpu()) for k, v in last.state_dict().items())
    best = load_converted(r.checkpoint)
    assert best.num_classes == 10
    # the lr (the mean over an epoch's updates) followed timm's linear warmup from 1e-5 over
    # epoch 1, then its cosine over all 2 x 6 updates, computed here by hand
    peak, warm, u = 0.4 * 16 / 256, 1e-5, 6
    warmup = [warm + t * (peak - warm) / u for t in range(u)]
    cosine = [0.5 * peak * (1 + math.cos(math.pi * t / (2 * u))) for t in range(u, 2 * u)]
    assert lines[0]["lr"] == pytest.approx(sum(warmup) / u, rel=1e-9)
    assert lines[1]["lr"] == pytest.approx(sum(cosine) / u, rel=1e-9)
    assert [row["schedule_epochs"] for row in lines] == [2, 2]


def _interrupt_at(description: str, step: int, how: str):
    def progress(desc, completed, total, info=""):
        if desc == description and completed == step:
            if how == "signal":  # a real Ctrl-C: the handler lets the batch finish
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("where, saved_at", [(("epoch 2/2", 0, "raise"), (1, 0)),
                                             (("epoch 1/2", 3, "raise"), (0, 3)),
                                             (("epoch 1/2", 2, "signal"), (0, 2)),
                                             (("val 1/2", 1, "signal"), (0, 6))],
                         ids=["between-epochs", "mid-epoch", "sigint", "sigint-in-validation"])
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, two_epochs, where, saved_at):
    with pytest.raises(TrainingInterrupted) as info:
        finetune("resnet10t", "synthetic", output=tmp_path, recipe="resnet", epochs=2,
                 warmup_epochs=1, progress=_interrupt_at(*where), **TINY)
    assert info.value.saved
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == saved_at
    resumed = finetune("resnet10t", "synthetic", output=tmp_path, resume=True)
    _assert_rows_close(_rows(resumed), _rows(two_epochs))
    ref = two_epochs.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), ref[k].float(), atol=1e-6, rtol=1e-5), k


def test_resume_rejects_changed_options(tmp_path, two_epochs):
    import shutil

    shutil.copytree(two_epochs.output, tmp_path / "run")
    with pytest.raises(SbnSurgeryError, match="batch-size 8 \\(stored: 16\\)"):
        finetune("resnet10t", "synthetic", output=tmp_path / "run", batch_size=8, resume=True)
    with pytest.raises(SbnSurgeryError, match="epochs 1 \\(stored: 2\\).*may only grow"):
        finetune("resnet10t", "synthetic", output=tmp_path / "run", epochs=1, resume=True)


def test_resume_rejects_another_number_of_processes(tmp_path, two_epochs):
    import shutil

    shutil.copytree(two_epochs.output, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["world"] == 1
    state["world"] = 2  # as if trained under torchrun with 2 processes
    torch.save(state, tmp_path / "run" / "state.pt")
    with pytest.raises(CheckpointError, match="trained with 2 process\\(es\\), this one has 1"):
        finetune("resnet10t", "synthetic", output=tmp_path / "run", resume=True)


def test_default_lr_follows_the_global_batch():
    from sbn_surgery.train.options import RunOptions, resolve

    one = resolve(RunOptions(data="synthetic", batch_size=64))
    four = resolve(RunOptions(data="synthetic", batch_size=64), world=4)
    assert one.lr == pytest.approx(0.1) and four.lr == pytest.approx(0.4)
    assert resolve(RunOptions(data="synthetic", lr=0.05), world=4).lr == 0.05


@pytest.mark.parametrize("epochs, want", [(1, 0.1), (3, 0.3), (10, 1.0), (90, 1.0)])
def test_default_warmup_is_a_tenth_of_a_short_run(epochs, want):
    from sbn_surgery.train.options import RunOptions, resolve

    assert resolve(RunOptions(data="synthetic", epochs=epochs)).warmup_epochs == pytest.approx(want)
    given = resolve(RunOptions(data="synthetic", epochs=epochs, warmup_epochs=0.5 * epochs))
    assert given.warmup_epochs == 0.5 * epochs  # a given value wins
    stored = resolve({}, saved={"data": "synthetic", "epochs": 20, "warmup_epochs": 2.0})
    assert stored.warmup_epochs == 2.0  # and so does the resumed run's


def test_resume_without_state_and_fresh_run_over_a_run(tmp_path, two_epochs):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        finetune("resnet10t", "synthetic", output=tmp_path / "empty", resume=True)
    with pytest.raises(CheckpointError, match="--resume"):
        finetune("resnet10t", "synthetic", output=two_epochs.output, **TINY)


def test_killed_checkpoint_write_keeps_the_good_file(tmp_path, two_epochs, monkeypatch):
    import safetensors.torch

    path = tmp_path / "last.safetensors"
    O.save_checkpoint(two_epochs.model, path)
    good = path.read_bytes()

    def dying_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)  # part of a file, then the process 'dies'
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        O.save_checkpoint(two_epochs.model, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]

    def dying_bytes(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_bytes)
    (tmp_path / "state.pt").write_bytes(b"old")
    with pytest.raises(OSError):
        O.save_state(tmp_path / "state.pt", {"epoch": 1})
    assert (tmp_path / "state.pt").read_bytes() == b"old"


def test_converted_checkpoint_gets_a_new_head_and_trains_sbn_only(tmp_path):
    from sbn_surgery import convert, save_converted

    # timm's zero-init of each block's last BN has moved into the SBN after it (standard init), so
    # the SBN's gamma gets a gradient even while that BN is frozen
    net, _ = convert("resnet10t", "resnet", num_classes=3, input_size=(3, 32, 32))
    save_converted(net, tmp_path / "in.safetensors")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = finetune(str(tmp_path / "in.safetensors"), "synthetic", output=tmp_path / "out",
                 epochs=1, train="sbn", **TINY)
    assert r.model.num_classes == 10 and r.model.sbn_meta["num_classes"] == 10
    assert r.to_json()["head"] == {"before": 3, "after": 10, "cause": "data"}
    assert r.to_json()["calibration"] is None  # a converted file is not calibrated again
    after = r.model.state_dict()
    changed = {k for k, v in after.items() if k in before and v.shape == before[k].shape
               and v.dtype.is_floating_point and not torch.equal(v, before[k])}
    params = {k for k, _ in r.model.named_parameters()}
    trained = changed & params
    assert trained and all(".sbn." in k for k in trained)  # frozen conv/BN weights stay
    assert any(".sbn.weight" in k for k in trained)


def test_train_modes_select_parameters():
    import timm

    from sbn_surgery import convert

    net, _ = convert("resnet10t", "resnet", num_classes=4, input_size=(3, 32, 32))
    head = {id(p) for p in net.get_classifier().parameters()}
    M.select_trainable(net, "norm")
    for name, mod in net.named_modules():
        for p in mod.parameters(recurse=False):
            is_norm = isinstance(mod, (torch.nn.BatchNorm2d, SpectralBatchNorm2d))
            assert p.requires_grad == (is_norm or id(p) in head), name
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    with pytest.raises(SbnSurgeryError, match="no SBN layers"):
        M.select_trainable(plain, "sbn")


def test_cuda_asked_but_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        finetune("resnet10t", "synthetic", device="cuda", epochs=1)


def test_sync_batchnorm_keeps_sbn_hooks():
    from sbn_surgery import convert
    from sbn_surgery.train.distributed import to_sync_batchnorm

    net, _ = convert("resnet10t", "resnet", num_classes=4, input_size=(3, 32, 32))
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    want = net(x)
    sbn_calls = []
    for m in net.modules():
        if isinstance(m, SpectralBatchNorm2d):
            m.register_forward_hook(lambda *a: sbn_calls.append(1))
    synced = to_sync_batchnorm(net, torch.device("cuda"))  # builds modules only; no CUDA needed
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    n_sbn = sum(isinstance(m, SpectralBatchNorm2d) for m in synced.modules())
    assert torch.allclose(synced(x), want, atol=1e-5)  # eval: SyncBatchNorm == BatchNorm
    assert len(sbn_calls) == n_sbn > 0
    assert all(m.process_group == "world" for m in synced.modules()
               if isinstance(m, SpectralBatchNorm2d))  # SBN statistics synchronized too
    with pytest.raises(DeviceError, match="CUDA only"):
        to_sync_batchnorm(net, torch.device("cpu"))


# ------------------------------------------------------------------------------- CLI
def _cli(monkeypatch, capsys, *args):
    from sbn_surgery_cli import app

    monkeypatch.setattr(sys, "argv", ["sbn-surgery", "finetune", *args])
    with pytest.raises(SystemExit) as exc:
        app.main()
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.mark.parametrize("case", ["missing", "no-images", "resume", "cuda", "output",
                                  "frequency-size", "kwargs-for-converted"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    args = ["resnet10t", "--data", "synthetic", "-o", str(tmp_path / "run"), "--epochs", "1"]
    if case == "output":  # a file where the output directory should be
        (tmp_path / "run").write_text("not a directory")
    elif case == "frequency-size":  # statistics of one spatial size, asked to train at another
        from sbn_surgery import convert, save_converted
        from sbn_surgery.recipe import Recipe

        recipe = Recipe.from_yaml_text("name: f\nsbn: {stats: frequency}\nrules:\n"
                                       "  - {paths: ['layer4.0.bn2']}\n")
        net, _ = convert("resnet10t", recipe, input_size=(3, 32, 32))
        save_converted(net, tmp_path / "f.safetensors")
        args[0] = str(tmp_path / "f.safetensors")
        args += ["--input-size", "3", "64", "64"]
    elif case == "kwargs-for-converted":  # timm options for a model that is already built
        from sbn_surgery import convert, save_converted

        net, _ = convert("resnet10t", "resnet", input_size=(3, 32, 32))
        save_converted(net, tmp_path / "c.safetensors")
        args[0] = str(tmp_path / "c.safetensors")
        args += ["--model-kwargs", "drop_rate=0.1"]
    elif case == "missing":
        args[2] = str(tmp_path / "nope")
    elif case == "no-images":
        (tmp_path / "d" / "train" / "a").mkdir(parents=True)
        (tmp_path / "d" / "val" / "a").mkdir(parents=True)
        args[2] = str(tmp_path / "d")
    elif case == "resume":
        args.append("--resume")
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args += ["--device", "cuda"]
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in err and out == ""  # not even the blank line of an unused bar
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err


def test_cli_json_summary(tmp_path, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "resnet10t", "--data", "synthetic", "--subset",
                          "48", "--batch-size", "16", "--input-size", "3", "32", "32",
                          "--epochs", "1", "-o", str(tmp_path), "--json")
    assert code in (0, None), err
    summary = json.loads(out)
    assert set(summary) == {"val_top1", "val_loss", "epochs", "checkpoint", "images_per_s",
                            "head", "calibration"}
    # a 48-image subset gives 3 calibration batches of 16, not the 4 asked for; said on stderr
    assert summary["head"] is None  # synthetic has 10 classes, the model is built with 10
    assert summary["calibration"] == {"source": "synthetic, the 48-image --subset",
                                      "images": 48, "batches": 3}
    assert ("calibration: SBN statistics from 48 training images of synthetic, the 48-image "
            "--subset (3 batches)") in " ".join(err.split())
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["epochs"] == 1 and summary["val_top1"] == row["top1"]
    assert summary["val_loss"] == row["val_loss"]
    assert summary["images_per_s"] == pytest.approx(row["images"] / row["train_time_s"])
    assert summary["checkpoint"] == str(tmp_path / "best.safetensors")


@pytest.mark.slow
def test_amp_channels_last_and_compile_on_cpu(tmp_path, monkeypatch):
    # bf16 autocast reaches the SBN layers (statistics stay float32); channels_last reaches the
    # model and its inputs; --compile wraps the model (inductor itself is too slow for the suite,
    # so the test compiles with the eager backend)
    compiled, seen = [], []
    real_compile = torch.compile

    def compile_eager(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    from sbn_surgery import convert

    net, _ = convert("resnet10t", "resnet", num_classes=10, input_size=(3, 32, 32))
    for m in net.modules():
        if isinstance(m, SpectralBatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: seen.append(
                (args[0].dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
    r = finetune(net, "synthetic", output=tmp_path, epochs=1, amp=True, channels_last=True,
                 compile=True, **TINY)
    assert len(compiled) == 1
    assert seen and all(dtype == torch.bfloat16 and cl for dtype, cl in seen)
    assert all(torch.isfinite(torch.tensor(r.history[0][k])) for k in ("loss", "val_loss"))
    sbn = next(m for m in r.model.modules() if isinstance(m, SpectralBatchNorm2d))
    assert sbn.running_var.dtype == torch.float32 and sbn.weight.dtype == torch.float32
    assert sbn.num_batches_tracked > 0


def test_two_classes_report_no_top5_and_leave_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from test_data import _folder

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook user's choice, say
    try:
        root = _folder(tmp_path / "ds", per=8, size=(32, 32))
        r = finetune("resnet10t", root, output=tmp_path / "run", recipe="resnet", epochs=1,
                     batch_size=8, input_size=(3, 32, 32))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert r.val_top5 is None and r.history[0]["top5"] is None  # top-5 of 2 classes is always 1
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["top5"] is None and r.val_top1 == lines[0]["top1"]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_while_writing_the_best_checkpoint_leaves_that_epoch_to_validate_again(
        tmp_path, monkeypatch):
    real = O.save_checkpoint

    def interrupted_best(model, path):
        if path.name == O.BEST_FILE:
            raise KeyboardInterrupt  # a second Ctrl-C, mid-write
        real(model, path)

    monkeypatch.setattr(O, "save_checkpoint", interrupted_best)
    with pytest.raises(TrainingInterrupted):
        finetune("resnet10t", "synthetic", output=tmp_path, recipe="resnet", epochs=1, **TINY)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["epoch"] == 0 and state["step"] > 0  # training done, validation not yet
    assert state["best_epoch"] == 0 and state["history"] == []
    monkeypatch.setattr(O, "save_checkpoint", real)
    r = finetune("resnet10t", "synthetic", output=tmp_path, resume=True)
    assert r.epochs == 1 and r.best_epoch == 1 and (tmp_path / O.BEST_FILE).is_file()
