"""finetune in timm train.py's terms: optimizers, schedulers, EMA, mixup, accumulation,
clipping, --config/args.yaml, extending a finished run, summary.csv."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sbn_surgery.errors import SbnSurgeryError
from sbn_surgery.train import TrainingInterrupted, finetune
from sbn_surgery.train.config import load_config, read_config
from sbn_surgery.train.options import resolve

TINY = dict(subset=64, batch_size=16, input_size=(3, 32, 32), recipe="resnet", workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _stop_at(description: str, step: int):
    def progress(desc, completed, total, info=""):
        if desc == description and completed == step:
            raise KeyboardInterrupt

    return progress


def _rows(result, keys=("loss", "val_loss", "top1", "lr", "ema_val_loss", "ema_top1")):
    return [[r.get(k) for k in keys] for r in result.history]


def _same_run(a, b) -> None:
    for ra, rb in zip(_rows(a), _rows(b), strict=True):
        for x, y in zip(ra, rb):
            assert (x is None) == (y is None)
            if x is not None:
                assert x == pytest.approx(y, rel=1e-5, abs=1e-7)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6), k


CASES = {
    "sgd-cosine": dict(opt="sgd", sched="cosine"),
    "adamw-cosine-ema": dict(opt="adamw", sched="cosine", model_ema=True, model_ema_decay=0.5),
    "lamb-mixup-accum-clip": dict(opt="lamb", sched="cosine", mixup=0.4, cutmix=1.0,
                                  grad_accum_steps=2, clip_grad=1.0),
    "lion-cosine": dict(opt="lion", sched="cosine"),
    "sgd-step": dict(opt="sgd", sched="step", decay_epochs=1, decay_rate=0.5),
    "sgd-plateau": dict(opt="sgd", sched="plateau", patience_epochs=1, decay_rate=0.5),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_optimizers_and_schedules_train_and_resume_exactly(tmp_path, case):
    opts = dict(TINY, epochs=2, **CASES[case])
    ref = finetune("resnet10t", "synthetic", output=tmp_path / "ref", **opts)
    assert len(ref.history) == 2 and all(math.isfinite(r["loss"]) for r in ref.history)
    with pytest.raises(TrainingInterrupted):
        finetune("resnet10t", "synthetic", output=tmp_path / "cut", progress=_stop_at(
            "epoch 1/2", 2), **opts)
    resumed = finetune("resnet10t", "synthetic", output=tmp_path / "cut", resume=True)
    _same_run(resumed, ref)


@pytest.mark.slow
def test_step_schedule_is_timms(tmp_path):
    """--sched step --decay-epochs 1 --decay-rate 0.5, per epoch: the lr of epoch 2 is half of
    epoch 1's (no warmup), as timm's StepLRScheduler sets it."""
    r = finetune("resnet10t", "synthetic", output=tmp_path, epochs=2, sched="step",
                 decay_epochs=1, decay_rate=0.5, warmup_epochs=0, sched_on_updates=False,
                 lr=0.02, **TINY)
    assert [row["lr"] for row in r.history] == pytest.approx([0.02, 0.01], rel=1e-12)


def test_weight_decay_skips_norm_bias_and_sbn_parameters():
    from sbn_surgery import SpectralBatchNorm2d, convert
    from sbn_surgery.train.optim import make_optimizer

    net, _ = convert("resnet10t", "resnet", num_classes=4, input_size=(3, 32, 32))
    opts = resolve(dict(data="synthetic", opt="adamw", weight_decay=0.1))
    groups = make_optimizer(net, opts).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(g["weight_decay"] in (0.0, 0.1) for g in groups)
    sbn = 0
    for mod in net.modules():
        for p in mod.parameters(recurse=False):
            norm = isinstance(mod, (torch.nn.BatchNorm2d, SpectralBatchNorm2d))
            sbn += isinstance(mod, SpectralBatchNorm2d)
            assert (id(p) in decayed) == (p.ndim >= 2 and not norm), type(mod).__name__
    assert sbn >= 4  # gamma and beta of at least two SBN layers were looked at


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_can_pick_the_best(tmp_path):
    from sbn_surgery.checkpoint import load_converted

    r = finetune("resnet10t", "synthetic", output=tmp_path, epochs=2, model_ema=True,
                 model_ema_decay=0.9, **TINY)
    for row in r.history:
        assert row["ema_val_loss"] != pytest.approx(row["val_loss"], rel=1e-4)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    ema = load_converted(tmp_path / "ema.safetensors").state_dict()
    last = load_converted(tmp_path / "last.safetensors").state_dict()
    assert all(torch.equal(ema[k], state["ema"][k]) for k in ema)
    assert any(not torch.equal(ema[k], last[k]) for k in ema if ema[k].is_floating_point())
    # EMA is the default --best-by with --model-ema: best.safetensors holds the EMA weights
    best_epoch = max(range(2), key=lambda i: r.history[i]["ema_top1"])
    assert r.best_top1 == r.history[best_epoch]["ema_top1"]
    if best_epoch == 1:
        best = load_converted(tmp_path / "best.safetensors").state_dict()
        assert all(torch.equal(best[k], ema[k]) for k in ema)


def test_a_timm_whose_plateau_scheduler_this_torch_refuses_is_one_clear_error(monkeypatch):
    """timm before 1.0.23 passes ``verbose`` to torch's ReduceLROnPlateau, which torch 2.14 no
    longer takes: said in one line that names both versions and the way out."""
    import timm.scheduler

    from sbn_surgery.train.optim import make_scheduler

    def old_timm(*args, **kwargs):
        raise TypeError("ReduceLROnPlateau.__init__() got an unexpected keyword argument "
                        "'verbose'")

    monkeypatch.setattr(timm.scheduler, "create_scheduler_v2", old_timm)
    optim = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(SbnSurgeryError, match="--sched plateau: timm .* upgrade timm"):
        make_scheduler(optim, resolve(dict(data="synthetic", sched="plateau")), 4)


def test_mixup_and_cutmix_make_soft_targets():
    from sbn_surgery.train.optim import make_criterion, make_mixup

    opts = resolve(dict(data="synthetic", mixup=0.8, cutmix=1.0, smoothing=0.1))
    mix = make_mixup(opts, num_classes=10)
    np.random.seed(0)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8)
    mixed, target = mix(x.clone(), y)
    assert target.shape == (8, 10) and torch.allclose(target.sum(1), torch.ones(8))
    assert not torch.equal(mixed, x)
    hard = torch.nn.functional.one_hot(y, 10).float()
    assert (target - hard).abs().max() > 0.1  # more than the smoothing's 0.1 / 10
    assert type(make_criterion(opts, mix)).__name__ == "SoftTargetCrossEntropy"
    assert make_mixup(resolve(dict(data="synthetic")), 10) is None


def test_one_epoch_of_a_timm_recipe(tmp_path):
    """lamb, EMA, mixup and cutmix, accumulation and clipping together, in one short epoch (the
    quick loop's and the dependency floors' check that timm's parts fit together)."""
    r = finetune("resnet10t", "synthetic", output=tmp_path, epochs=1, opt="lamb",
                 model_ema=True, model_ema_warmup=True, mixup=0.2, cutmix=1.0,
                 grad_accum_steps=2, clip_grad=1.0, **dict(TINY, subset=32))
    row = r.history[0]
    assert math.isfinite(row["loss"]) and row["ema_top1"] is not None
    assert (tmp_path / "ema.safetensors").is_file() and (tmp_path / "summary.csv").is_file()


def test_conversion_calibrates_on_the_subset_it_trains_on(tmp_path, monkeypatch):
    from sbn_surgery.train import model as train_model

    seen = []
    real = train_model.calibration_batches

    def spy(*args, **kwargs):
        seen.append(kwargs.get("subset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_model, "calibration_batches", spy)
    finetune("resnet10t", "synthetic", output=tmp_path, epochs=1, **TINY)
    assert seen == [TINY["subset"]]


def test_grad_accumulation_counts_optimizer_steps(tmp_path):
    finetune("resnet10t", "synthetic", output=tmp_path, epochs=1, opt="adamw",
             grad_accum_steps=3, **TINY)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    batches = 64 // 16  # --subset 64: 64 training images, 16 a batch
    assert steps == {math.ceil(batches / 3)} == {2}


def test_clip_grad_bounds_the_norm():
    from sbn_surgery.train.optim import clip_gradients

    w = torch.nn.Parameter(torch.ones(10))
    w.grad = torch.full((10,), 5.0)
    clip_gradients([w], resolve(dict(data="synthetic", clip_grad=1.0)))
    assert float(w.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    w.grad = torch.full((10,), 5.0)
    clip_gradients([w], resolve(dict(data="synthetic", clip_grad=0.5, clip_mode="value")))
    assert float(w.grad.max()) == pytest.approx(0.5)


@pytest.mark.slow
def test_drop_path_reaches_the_model_and_its_checkpoint_and_misplaced_options_are_said(
        tmp_path):
    from timm.layers import DropPath

    from sbn_surgery.checkpoint import load_converted

    notes = []
    r = finetune("resnet10t", "synthetic", output=tmp_path, epochs=1, drop_path=0.2, drop=0.3,
                 sync_stats=True, notify=notes.append, **TINY)
    assert len(notes) == 1 and "--sync-stats" in notes[0] and "one process" in notes[0]
    probs = [m.drop_prob for m in r.model.modules() if isinstance(m, DropPath)]
    assert probs and max(probs) == pytest.approx(0.2)
    again = load_converted(tmp_path / "last.safetensors")
    assert any(isinstance(m, DropPath) for m in again.modules())
    assert again.drop_rate == pytest.approx(0.3)
    plain = {k: v for k, v in TINY.items() if k != "recipe"}
    with pytest.raises(SbnSurgeryError, match="--drop-path applies to a timm model name only"):
        finetune(tmp_path / "last.safetensors", "synthetic", output=tmp_path / "x",
                 drop_path=0.1, **plain)
    with pytest.raises(SbnSurgeryError, match="--num-classes applies to a timm model name"):
        finetune(tmp_path / "last.safetensors", "synthetic", output=tmp_path / "x",
                 num_classes=10, **plain)


@pytest.mark.slow
def test_args_yaml_round_trips_and_repeats_the_run(tmp_path, run_cli):
    out = tmp_path / "a"
    res = run_cli("finetune", "resnet10t", "-d", "synthetic", "-o", out, "--epochs", "1",
                  "--subset", "64", "-b", "16", "--input-size", "3", "32", "32", "--opt",
                  "adamw", "--opt-betas", "0.9,0.99", "--model-ema", "--workers", "0", "--json")
    assert res.code == 0, res.stderr
    args = read_config(out / "args.yaml")
    assert args["opt"] == "adamw" and args["opt_betas"] == [0.9, 0.99] and args["model_ema"]
    assert args["model"] == "resnet10t" and args["lr"] == pytest.approx(4e-3 * 16 / 256)
    again_resolved = resolve({}, config=args).to_dict()  # fully resolved: nothing left to fill
    assert {k: v for k, v in again_resolved.items() if v is not None} == args
    again = tmp_path / "b"
    res = run_cli("finetune", "--config", out / "args.yaml", "-o", again, "--json")
    assert res.code == 0, res.stderr
    first, second = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
                     for d in (out, again))
    assert first["val_loss"] == pytest.approx(second["val_loss"], rel=1e-6)
    assert read_config(again / "args.yaml") == args
    # a flag given on the command line wins over the file
    res = run_cli("finetune", "--config", out / "args.yaml", "-o", tmp_path / "c", "--epochs",
                  "2", "--json")
    assert res.code == 0 and json.loads(res.stdout)["epochs"] == 2


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("opt: adamw\nlr: fast\n")
    with pytest.raises(SbnSurgeryError, match="run.yaml: --lr must be a number"):
        read_config(bad)
    bad.write_text("optt: adamw\n")
    with pytest.raises(SbnSurgeryError, match="run.yaml: unknown option 'optt'"):
        read_config(bad)
    bad.write_text("lr: 1e-3\n")  # YAML 1.1 reads this as text: taken as the number
    assert read_config(bad) == {"lr": 1e-3}
    bad.write_text("device: cpu\nworkers: 0\n")  # names timm has too: still this tool's file
    assert read_config(bad) == {"device": "cpu", "workers": 0}
    bad.write_text("- a\n- b\n")
    with pytest.raises(SbnSurgeryError, match="must map option names"):
        read_config(bad)


TIMM_ARGS = Path(__file__).parent / "data" / "timm_args.yaml"


def _timm_args(tmp_path, *edits: tuple[str, str], extra: str = "") -> Path:
    text = TIMM_ARGS.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "args.yaml"
    path.write_text(text + extra)
    return path


def test_a_timm_args_yaml_is_read_as_timm_reads_it():
    values, notes = load_config(TIMM_ARGS)
    assert notes == []  # what has no equivalent here is at the value a run here behaves as
    assert values["data"] == "/data/imagenet" and values["model"] == "resnet50"
    assert values["opt"] == "lamb" and values["model_ema"] and values["model_ema_warmup"]
    assert (values["mixup"], values["cutmix"], values["reprob"]) == (0.2, 1.0, 0.25)
    assert values["aa"] == "rand-m9-mstd0.5-inc1" and values["drop_path"] == 0.05
    assert values["sched_on_updates"] is False and values["warmup_epochs"] == 5
    for key in ("device", "amp", "dataset", "train_split", "val_split", "checkpoint", "lr",
                "interpolation", "mean", "std", "crop_pct"):
        assert key not in values, key  # timm's device, '' and null mean: the default here
    # timm's data flags are taken, under their names (train_interpolation: timm's random)
    assert (values["scale"], values["ratio"]) == ([0.08, 1.0], [0.75, 4 / 3])
    assert (values["hflip"], values["vflip"], values["color_jitter"]) == (0.5, 0.0, 0.4)
    assert values["train_interpolation"] == "random" and values["pretrained"] is False
    # no lr: timm's rule, lr_base x sqrt(global batch / lr_base_size) for lamb
    opts = resolve({}, config=values, world=2)
    assert opts.lr == pytest.approx(0.005 * math.sqrt(16 * 2 / 256))
    assert opts.best_by == "ema" and opts.weight_decay == 0.02


def test_a_timm_args_yaml_names_what_it_drops(tmp_path):
    path = _timm_args(tmp_path, ("layer_decay: null", "layer_decay: 0.65"),
                      ("pretrained: false", "pretrained: true"),
                      ("initial_checkpoint: ''", "initial_checkpoint: /w/r50.pth"),
                      ("img_size: null", "img_size: 160"), ("sync_bn: false", "sync_bn: true"),
                      ("opt: lamb", "opt: sgd"), ("ratio:\n- 0.75", "ratio:\n- 0.5"),
                      ("amp_dtype: bfloat16", "amp_dtype: float16"),
                      ("dataset: ''", "dataset: wds/imagenet"),
                      ("lr_noise: null", "lr_noise: [" + ", ".join(["0.5"] * 1000) + "]"),
                      ("mean: null", "mean: [0.5, 0.4, 0.3]"),
                      ("interpolation: ''", "interpolation: bilinear"),
                      extra="foo_bar: 1\n" + "x" * 500 + ": 2\n")
    values, notes = load_config(path)
    assert len(notes) == 1 and notes[0].startswith(f"{path}: read as timm train.py options")
    for part in ("layer_decay=0.65", "amp_dtype='float16'", "foo_bar"):
        assert part in notes[0], part
    assert "lr_noise=[0.5, 0.5," in notes[0] and len(notes[0]) < 1000  # long values are cut
    for taken in ("hflip", "scale", "ratio", "mean", "interpolation", "pretrained", "remode",
                  "eval_metric", "dist_bn"):
        assert taken not in notes[0], taken
    # timm's data flags are taken; timm loads initial_checkpoint over the pretrained weights
    assert values["ratio"] == [0.5, 4 / 3] and values["mean"] == [0.5, 0.4, 0.3]
    assert values["interpolation"] == "bilinear" and "pretrained" not in values
    assert values["checkpoint"] == "/w/r50.pth" and values["input_size"] == [3, 160, 160]
    assert values["sync_stats"] is True and values["lr_base_scale"] == "linear"  # sgd: linear
    assert (values["dataset"], values["train_split"], values["val_split"]) == (
        "wds/imagenet", "train", "validation")
    # float16 is named only where timm would have used it (with amp)
    values, notes = load_config(_timm_args(tmp_path, ("amp_dtype: bfloat16",
                                                      "amp_dtype: float16"),
                                           ("amp: true", "amp: false")))
    assert notes == [] and values["amp"] is False  # amp: true is the default here; false stays


def test_a_timm_args_yaml_asks_for_pretrained_weights_and_bounds_its_data_flags(tmp_path):
    values, notes = load_config(_timm_args(tmp_path, ("pretrained: false", "pretrained: true"),
                                           ("model: resnet50", "model: resnet50.a1_in1k")))
    assert notes == [] and values["pretrained"] is True and values["model"] == "resnet50.a1_in1k"
    # a hostile value is refused in one short line, not echoed in full
    huge = _timm_args(tmp_path, ("mean: null", "mean: [" + ", ".join(["0.5"] * 100000) + "]"))
    with pytest.raises(SbnSurgeryError, match=r"--mean expects 1 to 64 .*\(100000 values\)") as e:
        load_config(huge)
    assert len(str(e.value)) < 400
    for edit, flag in ((("scale:\n- 0.08\n- 1.0", "scale:\n- 0.9\n- 0.1"), "--scale"),
                       (("std: null", "std: [0.2, 0.0, 0.2]"), "--std values must be > 0"),
                       (("hflip: 0.5", "hflip: 1.5"), "--hflip must be"),
                       (("train_interpolation: random", "train_interpolation: cubic"),
                        "--train-interpolation 'cubic' is not one of")):
        with pytest.raises(SbnSurgeryError, match=re.escape(flag)):
            load_config(_timm_args(tmp_path, edit))


def test_our_own_lr_base_options_follow_timms_rule():
    given = dict(data="synthetic", batch_size=32, grad_accum_steps=2, opt="adamw")
    assert resolve(given, world=2).lr == pytest.approx(4e-3 * 128 / 256)  # the default, linear
    opts = resolve({**given, "lr_base": 0.1, "lr_base_size": 512, "lr_base_scale": "sqrt"},
                   world=2)
    assert opts.lr == pytest.approx(0.1 * math.sqrt(128 / 512))
    assert resolve({**given, "lr_base": 0.1, "lr": 0.3}, world=2).lr == 0.3  # --lr wins


@pytest.mark.slow
def test_amp_on_cpu_is_said_to_be_slow(tmp_path):
    notes = []
    with pytest.raises(TrainingInterrupted):  # the first step is enough: the line comes before
        finetune("resnet10t", "synthetic", output=tmp_path, amp=True, device="cpu",
                 notify=notes.append, progress=_stop_at("epoch 1/1", 1), **TINY, epochs=1)
    assert len(notes) == 1 and notes[0].startswith("--amp on CPU: bfloat16 autocast is")


def test_a_timm_args_yaml_runs_from_the_cli_and_says_what_it_drops(tmp_path, run_cli):
    path = _timm_args(tmp_path, ("layer_decay: null", "layer_decay: 0.65"))
    res = run_cli("finetune", "resnet10t", "--config", path, "-d", "synthetic", "-o",
                  tmp_path / "run", "--epochs", "1", "--warmup-epochs", "0", "--subset", "64",
                  "--input-size", "3", "32", "32", "--workers", "0", "--json")
    assert res.code == 0, res.stderr
    said = " ".join(res.stderr.split())  # the console wraps long lines
    assert "read as timm train.py options" in said and "layer_decay=0.65" in said
    args = read_config(tmp_path / "run" / "args.yaml")  # the resolved run, in this tool's names
    assert args["opt"] == "lamb" and args["model_ema"] and args["mixup"] == 0.2
    assert args["lr"] == pytest.approx(0.005 * math.sqrt(16 / 256))


@pytest.mark.slow
def test_resume_with_more_epochs_extends_a_finished_run(tmp_path):
    done = finetune("resnet10t", "synthetic", output=tmp_path, epochs=2, **TINY)
    notes = []
    more = finetune("resnet10t", "synthetic", output=tmp_path, resume=True, epochs=3,
                    notify=notes.append)
    assert len(more.history) == 3 and len(notes) == 1 and "from 2 to 3 epochs" in notes[0]
    assert _rows(more)[:2] == _rows(done)  # the finished epochs are kept as they were
    rows = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["schedule_epochs"] for r in rows] == [2, 2, 3]
    assert read_config(tmp_path / "args.yaml")["epochs"] == 3
    with pytest.raises(SbnSurgeryError, match="epochs 2 \\(stored: 3\\)"):
        finetune("resnet10t", "synthetic", output=tmp_path, resume=True, epochs=2)


@pytest.mark.slow
def test_summary_csv_has_timms_columns(tmp_path):
    r = finetune("resnet10t", "synthetic", output=tmp_path, epochs=2, **TINY)
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    for i, (row, rec) in enumerate(zip(rows, r.history, strict=True)):
        assert int(row["epoch"]) == i
        assert float(row["eval_top1"]) == pytest.approx(100 * rec["top1"])
        assert float(row["eval_loss"]) == pytest.approx(rec["val_loss"])
        assert float(row["train_loss"]) == pytest.approx(rec["loss"])
        assert float(row["lr"]) == pytest.approx(rec["lr"])
