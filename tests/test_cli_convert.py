"""recipes / inspect / convert from the command line, bad input included."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import sbn_surgery as sbn

SMALL = ["--input-size", "3", "32", "32"]


def _one_clean_error_line(result, *fragments):
    assert result.code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    text = " ".join(ln.strip() for ln in lines)
    assert text.startswith("error:")
    for frag in fragments:
        assert frag in text, text


def test_recipes_lists_and_prints(run_cli):
    listed = run_cli("recipes", "--json")
    assert listed.code == 0
    names = [r["name"] for r in json.loads(listed.stdout)["recipes"]]
    assert "resnet" in names and "default" in names
    table = run_cli("recipes")
    assert table.code == 0 and "RegNetX, RegNetY" in table.stdout
    regnet = next(r for r in json.loads(listed.stdout)["recipes"] if r["name"] == "regnet")
    assert any("[xyvz]" in m for m in regnet["models"])  # patterns kept literally
    shown = run_cli("recipes", "resnet")
    assert shown.code == 0 and "last_in_parent" in shown.stdout


def test_inspect_json_matches_spec_and_changes_nothing(run_cli, tmp_path):
    result = run_cli("inspect", "resnet50", "--recipe", "resnet", "--json", *SMALL)
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"model", "recipe", "count", "params_added", "sites"}
    assert data["model"] == "resnet50" and data["count"] == 9
    assert data["params_added"] == 2 * (6 * 1024 + 3 * 2048)
    assert data["sites"][0] == {"module": "layer3.0.bn3.sbn", "type": "BatchNorm2d",
                                "channels": 1024, "stats": "channel", "position": "after",
                                "layout": "nchw"}
    assert list(tmp_path.iterdir()) == []


def test_convert_writes_a_loadable_identity_checkpoint(run_cli, tmp_path):
    src = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
    ckpt = tmp_path / "r18.pth"
    torch.save(src.state_dict(), ckpt)
    out = tmp_path / "r18-sbn.safetensors"
    result = run_cli("convert", "resnet18", "--recipe", "resnet", "--checkpoint", ckpt,
                     "--num-classes", "10", "-o", out, "--json", *SMALL)
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["output"] == str(out) and data["init"] == "identity" and data["count"] == 4
    model = sbn.load_converted(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, got = src.eval()(x), model(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_convert_from_random_weights_is_reproducible_by_seed(run_cli, tmp_path):
    """Random weights come from --seed (default 0): the same command writes the same tensors
    whatever ran before it in the process, and another seed other weights."""
    from safetensors.torch import load_file

    def tensors(name, *seed):
        out = tmp_path / f"{name}.safetensors"
        torch.manual_seed(len(name))  # what ran before: another state of the global generator
        res = run_cli("convert", "resnet10t", "--num-classes", "3", "-o", out, *seed, *SMALL)
        assert res.code == 0, res.stderr
        return load_file(out)

    a, b, c = tensors("a"), tensors("bb", "--seed", "0"), tensors("ccc", "--seed", "1")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.0.weight"], c["conv1.0.weight"])


def test_unknown_model_suggests_names(run_cli, tmp_path):
    _one_clean_error_line(run_cli("inspect", "resnet5"), "unknown timm model 'resnet5'", "resnet50")


def test_missing_recipe_lists_shipped(run_cli):
    _one_clean_error_line(run_cli("inspect", "resnet18", "--recipe", "nope"),
                          "no recipe named 'nope'", "Shipped recipes:", "resnet")
    _one_clean_error_line(run_cli("inspect", "resnet18", "--recipe", "missing/r.yaml"),
                          "recipe file missing/r.yaml not found", "resnet")


@pytest.mark.parametrize("text,fragments", [
    ("name: x\nrules:\n  - types: [BatchNorm2d\n", ["bad.yaml:", "YAML syntax error"]),
    ("name: x\nrules:\n  - types: [BatchNorm2d]\n    where: after\n",
     ["bad.yaml:4", "rules.0.where", "unknown key"]),
])
def test_bad_recipe_files_give_file_line_key(run_cli, tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _one_clean_error_line(run_cli("inspect", "resnet18", "--recipe", path, *SMALL), *fragments)


def test_zero_matches(run_cli, tmp_path):
    path = tmp_path / "none.yaml"
    path.write_text("name: none\nrules:\n  - name: nothing\n    types: [GroupNorm]\n")
    _one_clean_error_line(run_cli("inspect", "resnet18", "--recipe", path, *SMALL),
                          "'nothing'", "matches no module", "BatchNorm2d")


def test_converting_a_converted_checkpoint_is_an_error(run_cli, tmp_path):
    out = tmp_path / "a.safetensors"
    assert run_cli("convert", "resnet18", "--num-classes", "10", "-o", out, *SMALL).code == 0
    _one_clean_error_line(run_cli("convert", "resnet18", "--num-classes", "10", "--checkpoint", out,
                                  "-o", tmp_path / "b.safetensors", *SMALL),
                          "already converted", "applied once")


def test_checkpoint_that_does_not_fit(run_cli, tmp_path):
    ckpt = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), ckpt)
    _one_clean_error_line(run_cli("convert", "resnet18", "--checkpoint", ckpt, "-o",
                                  tmp_path / "o.safetensors", *SMALL),
                          "does not fit", "unexpected key(s)")
