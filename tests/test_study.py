"""study: paired arms x seeds on top of finetune, resume, the report and its arithmetic."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from sbn_surgery.study import parse_arm, parse_arms, study
from sbn_surgery.study.stats import T975, paired_difference, t_quantile, verdict
from sbn_surgery.train import TrainingInterrupted

# test_resnet (timm's tiny ResNet) is named by no recipe's models: patterns, so recipes are forced
TINY = dict(subset=32, batch_size=16, input_size=(3, 16, 16), epochs=1, device="cpu", force=True)
ARGS = ("test_resnet", "synthetic")
CLI_ARGS = ("test_resnet", "--data", "synthetic")
CLI_TINY = ["--subset", "32", "--batch-size", "16", "--input-size", "3", "16", "16",
            "--epochs", "1", "--device", "cpu", "--force"]


class _Recorder:
    """Wraps finetune: the model's parameters and its first training batch, per run."""

    def __init__(self, real):
        self.real, self.runs = real, {}

    def __call__(self, net, data, **kw):
        key = tuple(str(kw["output"]).split("/")[-2:])  # (arm dir, seedK)
        rec = {"params": {n: p.detach().clone() for n, p in net.named_parameters()}}
        was = net.training
        with torch.no_grad():  # the function at init, on a fixed input (not the global RNG)
            x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
            rec["output"] = net.eval()(x)
        net.train(was)

        def first_batch(module, args):
            rec.setdefault("batch", args[0].detach().clone())

        handle = net.register_forward_pre_hook(first_batch)
        try:
            return self.real(net, data, **kw)
        finally:
            handle.remove()
            self.runs[key] = rec


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One finished study: arms none and resnet, seeds 0 and 1, one tiny epoch each."""
    import sbn_surgery.train as T

    out = tmp_path_factory.mktemp("study") / "s"
    rec = _Recorder(T.finetune)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "finetune", rec)
        result = study(*ARGS, arms=["none", "resnet"], seeds=2, output=out, **TINY)
    return out, result, rec


def test_arms_share_initial_weights_and_batches_within_a_seed(base):
    _, result, rec = base
    assert set(rec.runs) == {(a, f"seed{k}") for a in ("none", "resnet") for k in (0, 1)}
    for k in (0, 1):
        none, sbn = rec.runs[("none", f"seed{k}")], rec.runs[("resnet", f"seed{k}")]
        shared = set(none["params"]) & set(sbn["params"])
        assert len(shared) == len(none["params"]) < len(sbn["params"])  # SBN adds parameters
        # convert moves timm's zero-init of a block's last norm to the SBN after it
        # (carry_zero_init): those hosts' gammas are 1 instead of 0, the SBN's gamma is 0
        hosts = {n[: -len(".sbn.weight")] for n in sbn["params"] if n.endswith(".sbn.weight")}
        differ = {n for n in shared if not torch.equal(none["params"][n], sbn["params"][n])}
        assert differ <= {f"{h}.weight" for h in hosts}
        for h in hosts:
            if f"{h}.weight" in differ:
                assert not none["params"][f"{h}.weight"].any()
                assert (sbn["params"][f"{h}.weight"] == 1).all()
                assert not sbn["params"][f"{h}.sbn.weight"].any()
        assert len(differ) < len(shared) // 4
        torch.testing.assert_close(none["output"], sbn["output"])  # same function at init
        assert torch.equal(none["batch"], sbn["batch"])
    # and the seeds do differ, so the equalities above are not trivially true
    w0 = rec.runs[("none", "seed0")]["params"]["conv1.0.weight"]
    w1 = rec.runs[("none", "seed1")]["params"]["conv1.0.weight"]
    assert not torch.equal(w0, w1)
    assert not torch.equal(rec.runs[("none", "seed0")]["batch"], rec.runs[("none", "seed1")]["batch"])
    assert result.trained_runs == 4


def test_report_json_schema_and_rerun_trains_nothing(base, run_cli, monkeypatch, tmp_path):
    import matplotlib
    import sbn_surgery.train as T

    out, first, _ = base

    def no_training(*a, **k):
        raise AssertionError("a finished study trained again")

    monkeypatch.setattr(T, "finetune", no_training)
    backend = matplotlib.get_backend()
    res = run_cli("study", *CLI_ARGS, "--arms", "none,resnet", "--seeds", "2", *CLI_TINY,
                  "-o", out, "--json")
    assert res.code == 0, res.stderr
    assert matplotlib.get_backend() == backend
    assert "top-1" not in res.stderr and "┃" not in res.stderr  # no table under --json
    doc = json.loads(res.stdout)
    assert set(doc) >= {"arms", "differences", "plot"}
    assert [a["name"] for a in doc["arms"]] == ["none", "resnet"]
    for arm in doc["arms"]:
        assert set(arm) >= {"name", "recipe", "top1_mean", "top1_std", "loss_mean",
                            "images_per_s", "step_ratio", "rms_growth", "runs"}
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        tops = [r["val_top1"] for r in arm["runs"]]
        assert arm["top1_mean"] == pytest.approx(sum(tops) / 2)
        assert arm["top1_std"] == pytest.approx(abs(tops[0] - tops[1]) / math.sqrt(2))
        half = t_quantile(1) * arm["top1_std"] / math.sqrt(2)  # t(0.975, 1) = 12.706
        assert arm["top1_ci95"] == pytest.approx([arm["top1_mean"] - half,
                                                  arm["top1_mean"] + half])
        init = json.loads((out / arm["name"] / "init.json").read_text())
        assert arm["rms_growth"] == init["rms_growth"] and arm["rms_growth"] > 0
        speeds = []
        for r in arm["runs"]:
            rows = [json.loads(x) for x in (out / arm["name"] / f"seed{r['seed']}" /
                                            "metrics.jsonl").read_text().splitlines()]
            speeds.append(sum(x["images"] for x in rows) / sum(x["train_time_s"] for x in rows))
        assert arm["images_per_s"] == pytest.approx(sum(speeds) / len(speeds))
        for r in arm["runs"]:
            rows = (out / arm["name"] / f"seed{r['seed']}" / "metrics.jsonl").read_text()
            assert r["val_top1"] == json.loads(rows.splitlines()[-1])["top1"]
    assert doc["arms"][0]["recipe"] is None and doc["arms"][1]["recipe"] == "resnet"
    assert doc["arms"][0]["step_ratio"] == pytest.approx(1.0)
    (diff,) = doc["differences"]
    assert diff["arm"] == "resnet" and diff["vs"] == "none" and "t-interval" in diff["method"]
    runs = {a["name"]: [r["val_top1"] for r in a["runs"]] for a in doc["arms"]}
    mean, ci = paired_difference(runs["resnet"], runs["none"])
    assert diff["mean"] == pytest.approx(mean) and diff["ci95"] == pytest.approx(ci)
    assert diff["verdict"] == verdict(ci, 2)
    assert open(doc["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert doc["arms"] == first.to_json()["arms"]
    human = run_cli("study", *CLI_ARGS, "--arms", "none,resnet", "--seeds", "2", *CLI_TINY, "-o", out)
    assert human.code == 0 and "resnet" in human.stdout and "95 %" in human.stdout
    assert "feature maps at the SBN sites" in human.stdout and "max |x|" in human.stdout


def test_feature_measures_per_arm_seed_and_epoch_and_their_pairing(base):
    from sbn_surgery.study.features import FIGURES, run_figures

    out, result, _ = base
    doc = result.to_json()
    study_json = json.loads((out / "study.json").read_text())
    assert study_json["format"] == 2 and set(study_json) == {"format", "options", "features"}
    measured = study_json["features"]["measured"]
    assert measured["images"] == doc["feature_images"] == 160  # synthetic's whole val split
    assert measured["norm_stats"] == "batch" and measured["reference_recipe"] == "resnet"
    runs = study_json["features"]["runs"]
    sites = {}
    for arm in ("none", "resnet"):
        for k in ("0", "1"):
            rows = runs[arm][k]
            assert [r["epoch"] for r in rows] == [0, 1]  # initialization and every epoch
            on_disk = json.loads((out / arm / f"seed{k}" / "features.json").read_text())
            assert on_disk["epochs"] == rows
            for r in rows:
                assert r["max_abs"] == max(s["max_abs"] for s in r["sites"])
            sites[arm, k] = [s["module"] for s in rows[0]["sites"]]
    # the none arm is measured where the resnet arm has its SBN layers
    assert sites["none", "0"] == sites["resnet", "0"] == sites["resnet", "1"]
    assert sites["none", "0"] and all(p.endswith(".sbn") for p in sites["none", "0"])
    # trained weights differ from initialization, and so do the measures
    assert runs["none"]["0"][1]["max_abs"] != runs["none"]["0"][0]["max_abs"]
    for arm in doc["arms"]:
        figs = [run_figures({r["epoch"]: r for r in runs[arm["name"]][str(s)]}, 1) for s in (0, 1)]
        for key in FIGURES:
            values = [f[key] for f in figs]
            expect = None if None in values else sum(values) / 2
            assert arm["features"][key] == (pytest.approx(expect) if expect is not None else None)
        assert [r["features"] for r in arm["runs"]] == figs
    (diff,) = doc["differences"]
    a = [run_figures({r["epoch"]: r for r in runs["resnet"][s]}, 1)["max_abs"] for s in "01"]
    b = [run_figures({r["epoch"]: r for r in runs["none"][s]}, 1)["max_abs"] for s in "01"]
    mean, ci = paired_difference(a, b)
    assert diff["features"]["max_abs"]["mean"] == pytest.approx(mean)
    assert diff["features"]["max_abs"]["ci95"] == pytest.approx(ci)
    (stored,) = study_json["features"]["differences"]
    assert stored["arm"] == "resnet" and stored["max_abs"] == diff["features"]["max_abs"]
    assert open(doc["features_plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert doc["features_plot"] == str(out / "study_features.png")


def test_a_finished_run_keeps_what_the_report_needs(base):
    out, _, _ = base
    for arm in ("none", "resnet"):
        for k in (0, 1):
            run = out / arm / f"seed{k}"
            kept = {p.name for p in run.iterdir()}
            assert {"best.safetensors", "metrics.jsonl", "features.json"} <= kept
            assert not kept & {"state.pt", "last.safetensors", "ema.safetensors"}


def test_resume_after_an_interrupt_in_the_middle_of_an_arm(base, tmp_path):
    out, first, _ = base
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "resnet" / "seed1")  # the last run is yet to be done
    seen: list[tuple[str, int]] = []

    def kill_after_one_batch(desc, done, total, info=""):
        seen.append((desc, done))
        if desc == "resnet seed1 epoch 1/1" and done == 1:
            raise KeyboardInterrupt  # as Ctrl-C inside the training loop

    with pytest.raises(TrainingInterrupted):
        study(*ARGS, arms=["none", "resnet"], seeds=2, output=copy, progress=kill_after_one_batch,
              **TINY)
    assert (copy / "resnet" / "seed1" / "state.pt").is_file()
    seen.clear()
    resumed = study(*ARGS, arms=["none", "resnet"], seeds=2, output=copy,
                    progress=lambda d, n, t, info="": seen.append((d, n)), **TINY)
    trained = {d.rsplit(" epoch", 1)[0] for d, _ in seen if " epoch " in d}
    assert trained == {"resnet seed1"}  # the finished runs were reused
    assert [n for d, n in seen if d == "resnet seed1 epoch 1/1"][0] == 1  # resumed, not restarted
    assert resumed.trained_runs == 1
    assert resumed.to_json()["arms"][1]["runs"] == [
        dict(r, dir=r["dir"].replace(str(out), str(copy)))
        for r in first.to_json()["arms"][1]["runs"]]
    # the measures of the resumed run equal the uninterrupted one's, and so does their pairing
    assert (json.loads((copy / "resnet" / "seed1" / "features.json").read_text())
            == json.loads((out / "resnet" / "seed1" / "features.json").read_text()))
    assert resumed.to_json()["differences"] == first.to_json()["differences"]
    assert not (copy / "resnet" / "seed1" / "state.pt").exists()  # finished: tidied


@pytest.mark.parametrize("damage", ['{"epoch": 1}\n',
                                    '{"epoch": 1, "top1": "x", "val_loss": 1.0}\n'])
def test_a_damaged_metrics_file_repeats_its_run(base, tmp_path, damage):
    """A finished run whose metrics.jsonl lost what the report reads is trained again (it was
    a traceback: the report read the top-1 of a line without one)."""
    out, first, _ = base
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    (copy / "none" / "seed1" / "metrics.jsonl").write_text(damage)
    again = study(*ARGS, arms=["none", "resnet"], seeds=2, output=copy, **TINY)
    assert again.trained_runs == 1
    rows = (copy / "none" / "seed1" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["top1"] == again.arms[0]["runs"][1]["val_top1"]
    assert again.arms[0]["runs"][1]["val_top1"] == first.arms[0]["runs"][1]["val_top1"]


def test_paired_interval_against_a_hand_computation():
    arm, base = [0.81, 0.83, 0.84], [0.80, 0.80, 0.82]
    # differences 0.01, 0.03, 0.02: mean 0.02, sample std 0.01, t(0.975, 2) = 4.303
    half = 4.303 * 0.01 / math.sqrt(3)  # 0.024843
    mean, ci = paired_difference(arm, base, quantile=lambda df: T975[df - 1])
    assert mean == pytest.approx(0.02)
    assert ci == pytest.approx([0.02 - half, 0.02 + half])
    assert verdict(ci, 3) == "no difference resolvable with 3 seeds"
    mean, ci = paired_difference([0.52, 0.53, 0.525, 0.535], [0.5] * 4)
    assert ci[0] > 0 and verdict(ci, 4) == "better"
    assert verdict([-0.03, -0.01], 4) == "worse"
    with pytest.raises(ValueError):
        paired_difference([0.5], [0.4])


def test_t_table_matches_scipy_and_the_normal_beyond_30():
    from scipy.stats import norm, t

    for df in range(1, 31):
        assert T975[df - 1] == pytest.approx(t.ppf(0.975, df), abs=6e-4), df
    assert t_quantile(3) == pytest.approx(3.182, abs=1e-3)
    assert norm.ppf(0.975) == pytest.approx(1.960, abs=1e-3)


def test_arm_specs_and_their_directories(tmp_path):
    own = tmp_path / "my recipe.yaml"
    own.write_text("name: mine\nrules:\n  - types: [BatchNorm2d]\n    stages: [-1]\n")
    dirs = {a.spec: a.dir for a in parse_arms(
        ["none", "resnet", "resnet:frequency", "resnet+remove-bn", str(own), f"{own}:frequency"])}
    assert dirs == {"none": "none", "resnet": "resnet", "resnet:frequency": "resnet-frequency",
                    "resnet+remove-bn": "resnet+remove-bn", str(own): "file-my_recipe",
                    f"{own}:frequency": "file-my_recipe-frequency"}
    freq = parse_arm("resnet:frequency").recipe
    assert freq.sbn.stats == "frequency" and parse_arm("resnet").recipe.sbn.stats == "channel"
    import hashlib  # a file's arm records the hash of the text its recipe was parsed from

    digest = hashlib.sha256(own.read_bytes()).hexdigest()
    assert parse_arm(str(own)).recipe_sha256 == parse_arm(f"{own}:frequency").recipe_sha256 \
        == digest and parse_arm("resnet").recipe_sha256 is None


@pytest.mark.parametrize("args, words", [
    (["--arms", "none,nosuch"], "no recipe named 'nosuch'"),
    (["--arms", "none,FIXED:frequency"], "sets 'stats' itself"),
    (["--arms", "resnet"], "no 'none' arm"),
    (["--arms", "none,resnet:fast"], "not a statistics mode"),
    (["--arms", "none,resnet", "--seeds", "1"], "at least 2"),
])
def test_bad_arms_and_seeds_are_one_line_errors(run_cli, tmp_path, args, words):
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("name: fixed\nsbn: {stats: channel}\nrules:\n  - types: [BatchNorm2d]\n")
    args = [a.replace("FIXED", str(fixed)) for a in args]
    res = run_cli("study", *CLI_ARGS, *args, *CLI_TINY, "-o", tmp_path / "out")
    assert res.code == 2 and words in res.stderr
    assert res.stderr.strip().count("\n") == 0 and res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_output_conflicts_are_one_line_errors(base, run_cli, tmp_path):
    out, _, _ = base
    other = run_cli("study", *CLI_ARGS, "--arms", "none,resnet", "--seeds", "2", *CLI_TINY[:-5],
                    "--epochs", "2", "--device", "cpu", "--force", "-o", out)
    assert other.code == 2 and "other options" in other.stderr and "epochs 2" in other.stderr
    assert other.stderr.strip().count("\n") == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    res = run_cli("study", *CLI_ARGS, "--arms", "none,resnet", "--seeds", "2", *CLI_TINY, "-o", busy)
    assert res.code == 2 and "not a study directory" in res.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = run_cli("study", *CLI_ARGS, "--arms", "none,resnet", "--seeds", "2", *CLI_TINY, "-o", afile)
    assert res.code == 2 and "is a file" in res.stderr and afile.read_text() == "x"


def test_remove_bn_arms_keep_sbn_and_neutralize_every_batchnorm():
    from sbn_surgery.diagnose import sbn_count
    from sbn_surgery.study.arms import build_arm_model

    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    kw = dict(seed=3, num_classes=10, checkpoint=None, model_kwargs=None, input_size=(3, 16, 16),
              calibration=calib, force=True)
    models = {s: build_arm_model(parse_arm(s), "test_resnet", **kw)
              for s in ("resnet", "resnet+remove-bn", "none+remove-bn")}
    assert sbn_count(models["resnet+remove-bn"]) == sbn_count(models["resnet"]) > 0
    assert sbn_count(models["none+remove-bn"]) == 0
    for spec in ("resnet+remove-bn", "none+remove-bn"):
        norms = [m for m in models[spec].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and all(getattr(m, "_sbn_no_norm", False) for m in norms), spec
        assert models[spec].sbn_meta["variant"] == "remove-bn"
    plain, removed = models["resnet"].state_dict(), models["resnet+remove-bn"].state_dict()
    assert plain.keys() == removed.keys()
    assert all(torch.equal(plain[k], removed[k]) for k in plain)  # same seed, same weights


def test_other_options_are_refused_once_a_run_began(tmp_path):
    from sbn_surgery.study.store import StudyError, check_output, save_options

    out = tmp_path / "s"
    save_options(out, {"data": "fashon-mnist", "epochs": 10})
    # nothing ran yet (the typo failed first): the corrected command starts the study afresh
    assert check_output(out, {"data": "fashion-mnist", "epochs": 10}) is False
    assert check_output(out, {"data": "fashon-mnist", "epochs": 10}) is True
    (out / "none").mkdir()
    with pytest.raises(StudyError, match="data 'fashion-mnist' \\(stored: 'fashon-mnist'\\)"):
        check_output(out, {"data": "fashion-mnist", "epochs": 10})
