"""Pretrained weights by name (--pretrained, --checkpoint hf-hub:ORG/NAME) from a Hugging Face
cache the tests build (tests/hub_cache.py), offline: exactly the cached weights, their
preprocessing in the converted file, one line when they are missing or the Hub is unreachable,
and nothing named inside a file ever fetching anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import HUB_NAME, HUB_USER_CFG, HUB_USER_REPO, one_line_error
from hub_cache import add_repo, hub_model, snapshot_dir, timm_config
from safetensors import safe_open
from safetensors.torch import save_file

import sbn_surgery as sbn
from sbn_surgery.checkpoint import read_checkpoint_metadata, read_data_config
from sbn_surgery.errors import CheckpointError
from sbn_surgery.models import create_model
from sbn_surgery.pretrained_cfg import KEYS

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ("--input-size", "3", "32", "32")


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _close(got, ref, rtol):
    return float((got - ref).abs().max() / ref.abs().max()) <= rtol


def test_convert_pretrained_loads_exactly_the_cached_weights(run_cli, offline_hub, no_fetch,
                                                             tmp_path):
    out = tmp_path / "r.safetensors"
    res = run_cli("convert", HUB_NAME, "--pretrained", "-o", out, "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["init"] == "identity" and "random" not in res.stderr
    assert 0 <= data["identity_max_rel_err"] <= 1e-4  # the identity check convert runs
    x = torch.randn(2, 3, 176, 176, generator=torch.Generator().manual_seed(0))
    ref = _outputs(hub_model(HUB_NAME), x)  # the weights the test put in the cache
    assert _close(_outputs(sbn.load_converted(out), x), ref, 1e-5)  # identity init holds
    assert not _close(_outputs(timm.create_model(HUB_NAME), x), ref, 1e-2)  # random differs
    cfg = read_checkpoint_metadata(out)["pretrained_cfg"]
    tag = timm.models.get_pretrained_cfg(HUB_NAME)
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == (
        list(tag.input_size), list(tag.mean), list(tag.std))
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bicubic", 0.875,
                                                                         "center")
    assert cfg["num_classes"] == 1000 and len(cfg["label_names"]) == 1000
    assert cfg["label_names"][0] == "n01440764"  # ImageNet's first synset, as timm names it
    from timm.data import resolve_data_config

    assert read_data_config(out) == resolve_data_config({}, model=timm.create_model(HUB_NAME))


def test_a_failed_identity_check_writes_nothing(run_cli, offline_hub, monkeypatch, tmp_path):
    C = sys.modules["sbn_surgery.convert"]  # the module (the package's name is the function)

    def off_by_a_little(model):  # an init that misses the identity by far more than rounding
        identity(model)
        for site in sbn.find_sbn(model):
            model.get_submodule(site.module).bias.data += 0.05

    identity = C.init_identity
    monkeypatch.setattr(C, "init_identity", off_by_a_little)
    out = tmp_path / "r.safetensors"
    one_line_error(run_cli("convert", HUB_NAME, "--pretrained", "-o", out, *SMALL),
                   "identity check failed for resnet10t.c3_in1k", "no file was written")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cli_matches_timms_own_pretrained_model_in_a_fresh_process(hub_cache, tmp_path):
    """The acceptance command as a user runs it, and timm.create_model(NAME, pretrained=True)
    under the same environment (huggingface_hub reads it at import: a fresh process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "r.safetensors"
    cli = subprocess.run([sys.executable, "-m", "sbn_surgery_cli", "convert", HUB_NAME,
                          "--pretrained", "-o", str(out)], env=env, capture_output=True,
                         text=True, timeout=240)
    assert cli.returncode == 0, cli.stderr
    code = ("import torch, timm, sbn_surgery as sbn\n"
            f"ref = timm.create_model({HUB_NAME!r}, pretrained=True).eval()\n"
            f"got = sbn.load_converted({str(out)!r}).eval()\n"
            "x = torch.randn(2, 3, 176, 176, generator=torch.Generator().manual_seed(1))\n"
            "with torch.no_grad():\n"
            "    r = ref(x)\n"
            "    print(float((got(x) - r).abs().max() / r.abs().max()))\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.timeout(60)
def test_offline_and_not_cached_is_one_line(run_cli, tmp_path, monkeypatch):
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r.safetensors"
    line = one_line_error(run_cli("convert", HUB_NAME, "--pretrained", "-o", out),
                          HUB_NAME, str(empty / "models--timm--resnet10t.c3_in1k"),
                          "HF_HUB_OFFLINE", "where a network exists", "--checkpoint FILE")
    assert not out.exists() and len(line) < 400


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", [("--pretrained",), ("--checkpoint", "hf-hub:me/nothing")])
def test_an_unreachable_hub_is_one_line_without_retries(run_cli, tmp_path, monkeypatch, spec):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    model = HUB_NAME if spec[0] == "--pretrained" else "resnet10t"
    one_line_error(run_cli("convert", model, *spec, "-o", tmp_path / "r.safetensors"),
                   "cannot be reached", "http://127.0.0.1:9", "--checkpoint FILE")


def test_the_cache_answers_without_the_network(hub_cache, monkeypatch, no_fetch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "hub").symlink_to(hub_cache)  # HF_HOME/hub is the cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_outputs(create_model(HUB_NAME, pretrained=True), x),
                       _outputs(hub_model(HUB_NAME), x))


def test_a_hub_checkpoint_brings_its_head_and_preprocessing(offline_hub, no_fetch, tmp_path):
    model, _ = sbn.convert("resnet10t", "resnet", checkpoint=f"hf-hub:{HUB_USER_REPO}")
    src = hub_model("resnet10t", seed=2, num_classes=10)  # stored as a pickle, with config.json
    assert model.num_classes == 10 and model.sbn_meta["input_size"] == [3, 48, 48]
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    assert _close(_outputs(model, x), _outputs(src, x), 1e-5)
    path = tmp_path / "ten.safetensors"
    sbn.save_converted(model, path)
    assert read_checkpoint_metadata(path)["pretrained_cfg"] == {**HUB_USER_CFG, "num_classes": 10}
    assert read_data_config(path) == {"input_size": (3, 48, 48), "mean": (0.3, 0.3, 0.3),
                                      "std": (0.2, 0.25, 0.3), "interpolation": "bilinear",
                                      "crop_pct": 0.9, "crop_mode": "center"}
    assert sbn.load_converted(path).pretrained_cfg["mean"] == (0.3, 0.3, 0.3)  # for timm's
    # the same snapshot as a local folder gives the same
    local = create_model("resnet10t", checkpoint=snapshot_dir(offline_hub, HUB_USER_REPO))
    assert local.num_classes == 10 and local.pretrained_cfg["std"] == (0.2, 0.25, 0.3)
    assert torch.equal(_outputs(local, x), _outputs(src, x))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_safetensors_first_and_pickles_only_weights_only(tmp_path, monkeypatch, no_fetch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good = hub_model("resnet10t", seed=5, num_classes=4)
    snap = add_repo(root, "me/both", good, config=timm_config(good))
    torch.save(hub_model("resnet10t", seed=6, num_classes=4).state_dict(),
               snap / "pytorch_model.bin")
    loaded = create_model("resnet10t", checkpoint="hf-hub:me/both")
    assert torch.equal(loaded.conv1[0].weight, good.conv1[0].weight)  # not the pickle's
    marker = tmp_path / "PWNED"
    evil = snapshot_dir(root, "me/evil")
    add_repo(root, "me/evil", good, weights="pytorch_model.bin")
    torch.save({"state_dict": good.state_dict(), "x": _Payload(marker)},
               evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        create_model("resnet10t", checkpoint="hf-hub:me/evil", num_classes=4)
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_a_tag_without_weights_is_said_to_be_random(run_cli, tmp_path, offline_hub):
    res = run_cli("convert", HUB_NAME, "-o", tmp_path / "a.safetensors", *SMALL, "--json")
    assert res.code == 0, res.stderr
    said = [ln for ln in res.stderr.splitlines() if "random" in ln]
    assert len(said) == 1, res.stderr
    for part in (HUB_NAME, "the weights are random", "--pretrained", "--checkpoint FILE"):
        assert part in said[0], part
    assert json.loads(res.stdout)["init"] == "standard"
    for args in (("resnet10t",), (HUB_NAME, "--pretrained")):  # no tag; weights loaded
        res = run_cli("convert", *args, "-o", tmp_path / "b.safetensors", *SMALL)
        assert res.code == 0 and "random" not in res.stderr, res.stderr


def test_names_and_weights_that_do_not_go_together(run_cli, offline_hub, tmp_path):
    out = tmp_path / "x.safetensors"
    one_line_error(run_cli("convert", "resnet10t.nope", "--pretrained", "-o", out),
                   "resnet10t has no pretrained tag 'nope'", "resnet10t.c3_in1k")
    one_line_error(run_cli("inspect", "resnet10t.nope"), "has no pretrained tag 'nope'")
    one_line_error(run_cli("convert", "resnet50t", "--pretrained", "-o", out),
                   "timm has no pretrained weights for resnet50t")
    one_line_error(run_cli("convert", HUB_NAME, "--pretrained", "--checkpoint", "w.pth",
                           "-o", out), "give one")
    one_line_error(run_cli("convert", "resnet10t", "--checkpoint", "hf-hub:../etc", "-o", out),
                   "is not a Hugging Face Hub repository")
    one_line_error(run_cli("convert", "resnet18", "--checkpoint", f"hf-hub:{HUB_USER_REPO}",
                           "-o", out), "is a resnet10t (its config.json says so)")
    assert not out.exists()


def _edit_meta(src, dst, **changes):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def small_converted(tmp_path_factory):
    model, _ = sbn.convert("resnet10t", "resnet", num_classes=10, input_size=(3, 32, 32))
    path = tmp_path_factory.mktemp("conv") / "small.safetensors"
    sbn.save_converted(model, path)
    return path


def test_nothing_named_inside_a_file_fetches_anything(small_converted, tmp_path, no_fetch,
                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: still nothing is fetched
    named = {"mean": [0.1, 0.2, 0.3], "hf_hub_id": "evil/x", "url": "http://127.0.0.1:9/w.pth",
             "file": "/etc/passwd", "source": "hf-hub"}
    path = _edit_meta(small_converted, tmp_path / "e.safetensors",
                      pretrained_cfg=json.dumps(named))
    assert set(read_checkpoint_metadata(path)["pretrained_cfg"]) <= set(KEYS)
    net = sbn.load_converted(path)
    assert net.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert net.pretrained_cfg.get("hf_hub_id") != "evil/x" and net.pretrained_cfg.get("file") is None
    snap = tmp_path / "snap"  # a snapshot whose config.json names sources and model arguments
    snap.mkdir()
    src = hub_model("resnet10t", seed=3, num_classes=10)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({
        "architecture": "resnet10t", "num_classes": 10, "pretrained_cfg": named,
        "model_args": {"pretrained": True, "checkpoint_path": "/etc/passwd"}}))
    local = create_model("resnet10t", checkpoint=snap)
    assert local.pretrained_cfg["mean"] == (0.1, 0.2, 0.3) and not local.pretrained_cfg.get("file")
    # a --config file asking for pretrained weights the cache lacks: one line, no download
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {HUB_NAME}\npretrained: true\ndata: synthetic\nsubset: 32\n")
    with pytest.raises(CheckpointError, match="never from a file"):
        sbn.finetune(config=run, output=tmp_path / "out", epochs=1, input_size=[3, 32, 32])


HOSTILE_CFGS = [
    ({"std": [0.2, 0.0, 0.2]}, "'pretrained_cfg.std' is invalid"),
    ({"input_size": [3, 10**6, 10**6]}, "'pretrained_cfg.input_size' is invalid"),
    ({"interpolation": "../../x"}, "'pretrained_cfg.interpolation' is invalid"),
    ({"label_names": ["x" * 300]}, "'pretrained_cfg.label_names' is invalid"),
    ({"label_names": ["a"] * 100_001}, "'pretrained_cfg.label_names' is invalid"),
    ({"mean": [float("nan")] * 3}, "'pretrained_cfg"),
    ("[1, 2]", "'pretrained_cfg' is invalid"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cfg, fragment", HOSTILE_CFGS, ids=[str(i) for i in range(7)])
def test_hostile_preprocessing_metadata_is_one_line(run_cli, small_converted, tmp_path, cfg,
                                                    fragment):
    text = cfg if isinstance(cfg, str) else json.dumps(cfg)
    path = _edit_meta(small_converted, tmp_path / "e.safetensors", pretrained_cfg=text)
    one_line_error(run_cli("diagnose", path, "--json"), fragment)
    with pytest.raises(CheckpointError, match="edited or damaged"):
        read_data_config(path)


@pytest.mark.timeout(60)
def test_a_hostile_snapshot_preprocessing_is_one_line(run_cli, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()},
              snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"pretrained_cfg": {"std": [0, 0, 0]}}))
    one_line_error(run_cli("convert", "resnet10t", "--checkpoint", snap, "-o",
                           tmp_path / "o.safetensors", *SMALL), "config.json: pretrained_cfg",
                   "'std'")


def test_inspect_and_diagnose_take_pretrained(run_cli, offline_hub, no_fetch, tmp_path,
                                              monkeypatch):
    res = run_cli("inspect", HUB_NAME, "--pretrained", "--json")
    assert res.code == 0 and json.loads(res.stdout)["count"] >= 1, res.stderr
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # inspect reads no weights
    assert run_cli("inspect", HUB_NAME, "--pretrained", "--json").code == 0
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_hub))
    from sbn_surgery.diagnose import load_model

    x = torch.randn(1, 3, 32, 32)
    net = load_model(HUB_NAME, pretrained=True)
    assert torch.equal(_outputs(net, x), _outputs(hub_model(HUB_NAME), x))
    res = run_cli("diagnose", HUB_NAME, "--pretrained", *SMALL, "--json")
    assert res.code == 0 and "random" not in res.stderr, res.stderr
    res = run_cli("diagnose", HUB_NAME, *SMALL, "--json")
    assert res.code == 0 and "the weights are random" in " ".join(res.stderr.split())


def test_a_model_with_weights_at_a_url_uses_torchs_cache(tmp_path, monkeypatch, no_fetch):
    name = "legacy_seresnet18.in1k"  # one of the few timm weights without a Hub repository
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"not in torch's hub cache .*torch/hub/checkpoints"):
        create_model(name, pretrained=True)
    src = hub_model(name, seed=4)
    url = timm.models.get_pretrained_cfg(name).url
    target = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(src.state_dict(), target)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_outputs(create_model(name, pretrained=True), x), _outputs(src, x))


def test_every_study_arm_starts_from_the_pretrained_weights(offline_hub, no_fetch):
    from sbn_surgery.study import parse_arm
    from sbn_surgery.study.arms import build_arm_model

    src = hub_model(HUB_NAME).state_dict()
    calib = [torch.randn(4, 3, 32, 32)]
    for spec in ("none", "resnet"):
        net = build_arm_model(parse_arm(spec), HUB_NAME, seed=0, num_classes=10,
                              checkpoint=None, model_kwargs={}, pretrained=True,
                              input_size=(3, 32, 32), calibration=calib)
        own = net.state_dict()
        shared = [k for k in src if not k.startswith("fc.")]
        assert all(torch.equal(own[k], src[k]) for k in shared), spec  # the head: 10 classes
        assert net.num_classes == 10


def test_class_names_only_where_the_weights_name_them(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "w.pth")
    model, _ = sbn.convert("resnet10t", "resnet", checkpoint=tmp_path / "w.pth",
                           input_size=(3, 32, 32))
    cfg = model.sbn_meta["pretrained_cfg"]  # a 1000-class file of unknown classes: no names
    assert cfg["num_classes"] == 1000 and "label_names" not in cfg
    assert cfg["input_size"] == [3, 32, 32] and cfg["interpolation"] == "bicubic"


def test_a_new_head_keeps_every_other_layer_and_a_missing_one_is_an_error(offline_hub, no_fetch,
                                                                           tmp_path, monkeypatch):
    ten = create_model(HUB_NAME, pretrained=True, num_classes=10)  # timm drops the 1000-class head
    src = hub_model(HUB_NAME).state_dict()
    own = ten.state_dict()
    assert ten.fc.out_features == 10
    assert all(torch.equal(own[k], v) for k, v in src.items() if not k.startswith("fc."))
    # weights that lack a layer, with a new head: timm loads them non-strictly and would leave
    # that layer random; that is refused
    root = tmp_path / "cache"
    snap = add_repo(root, "me/r10t-partial", hub_model("resnet10t", seed=7))  # no config.json
    partial = {k: v.contiguous() for k, v in hub_model("resnet10t", seed=7).state_dict().items()
               if not k.startswith("layer4.0.bn2.")}
    save_file(partial, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    with pytest.raises(CheckpointError, match=r"5 missing key\(s\): layer4.0.bn2.weight"):
        create_model("resnet10t", checkpoint="hf-hub:me/r10t-partial", num_classes=10)


def test_class_names_beyond_the_bounds_are_left_out_and_nothing_else_is():
    """What the weights or a run records keeps its preprocessing when only its class names are
    beyond the metadata's bounds; any other bad value is still an error."""
    from sbn_surgery.pretrained_cfg import MAX_LABELS, check_cfg
    from sbn_surgery.train.model import record_preprocessing

    many = {"mean": [0.5], "num_classes": MAX_LABELS + 1,
            "label_names": [str(i) for i in range(MAX_LABELS + 1)]}
    assert check_cfg(many, drop_bad_labels=True) == {"mean": [0.5], "num_classes": MAX_LABELS + 1}
    with pytest.raises(ValueError, match="label_names"):
        check_cfg(many)
    with pytest.raises(ValueError, match="'std"):
        check_cfg({**many, "std": [0.0]}, drop_bad_labels=True)
    model = torch.nn.Identity()
    model.sbn_meta = {}
    cfg = {"input_size": (3, 32, 32), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5),
           "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}
    record_preprocessing(model, cfg, ["x" * 300, "b"])  # a name longer than MAX_LABEL_CHARS
    assert model.sbn_meta["pretrained_cfg"] == {
        "input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash", "num_classes": 2}
