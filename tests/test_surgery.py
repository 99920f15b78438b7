"""The rewriter: matching, insertion, strip, calibration, identity init, checkpoints."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from conftest import randomize_norms

import sbn_surgery as sbn
from sbn_surgery.errors import CheckpointError, RecipeError, SurgeryError
from sbn_surgery.recipe import Recipe
from sbn_surgery.surgery import synthetic_batches

SIZE = (3, 64, 64)


def _model(name="resnet50", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def test_resnet_recipe_on_resnet50_puts_sbn_after_bn3_of_layer3_and_layer4():
    model = _model()
    plan = sbn.apply_recipe(model, "resnet", input_size=SIZE)
    assert [s.module for s in plan.sites] == (
        [f"layer3.{i}.bn3.sbn" for i in range(6)] + [f"layer4.{i}.bn3.sbn" for i in range(3)])
    assert {s.stage for s in plan.sites} == {3, 4}
    assert all(s.fold_into == s.target for s in plan.sites)
    assert plan.params_added == 2 * (6 * 1024 + 3 * 2048)
    assert [s.module for s in sbn.find_sbn(model)] == [s.module for s in plan.sites]


def test_basic_blocks_get_sbn_after_bn2():
    plan = sbn.apply_recipe(_model("resnet18"), "resnet", input_size=SIZE)
    assert [s.target for s in plan.sites] == ["layer3.0.bn2", "layer3.1.bn2", "layer4.0.bn2",
                                              "layer4.1.bn2"]


def test_state_dict_keys_kept_original_checkpoint_loads_and_strip_round_trips():
    model = _model("resnet18")
    original = copy.deepcopy(model.state_dict())
    plan = sbn.apply_recipe(model, "resnet", input_size=SIZE)
    keys = set(model.state_dict())
    assert set(original) <= keys
    assert keys - set(original) == set(plan.new_keys())
    result = model.load_state_dict(original, strict=False)
    assert sorted(result.missing_keys) == sorted(plan.new_keys())
    assert not result.unexpected_keys
    sbn.strip_sbn(model)
    stripped = model.state_dict()
    assert list(stripped) == list(original)
    assert all(torch.equal(stripped[k], original[k]) for k in original)
    assert not sbn.find_sbn(model)
    x = torch.randn(2, *SIZE)
    ref = _model("resnet18").eval()
    ref.load_state_dict(original)
    assert torch.equal(model.eval()(x), ref(x))  # no hook left behind
    sbn.apply_recipe(model, "resnet", input_size=SIZE)  # and can be converted again


def test_applying_twice_is_an_error():
    model = _model("resnet18")
    sbn.apply_recipe(model, "resnet", input_size=SIZE)
    with pytest.raises(SurgeryError, match=r"already has 4 SBN layer.*strip_sbn"):
        sbn.apply_recipe(model, "resnet", input_size=SIZE)


def test_rule_matching_nothing_names_rule_and_nearest_modules():
    recipe = Recipe.from_yaml_text(
        "name: t\nrules:\n  - name: typo\n    types: [BatchNorm2d]\n    paths: ['layer3.*.bn9']\n",
        source="t.yaml")
    with pytest.raises(SurgeryError, match=r"t.yaml: rule 1 \('typo'\) matches no module.*layer3"):
        sbn.apply_recipe(_model("resnet18"), recipe, input_size=SIZE)


def test_expect_catches_drift():
    recipe = Recipe.from_yaml_text(
        "name: t\nrules:\n  - types: [BatchNorm2d]\n    paths: ['layer4.*.bn2']\n    expect: 3\n")
    with pytest.raises(SurgeryError, match=r"matched 2 module.*expected exactly 3"):
        sbn.apply_recipe(_model("resnet18"), recipe, input_size=SIZE)


def test_later_rule_wins_and_positions():
    recipe = Recipe.from_yaml_text(
        "name: t\n"
        "rules:\n"
        "  - {types: [BatchNorm2d], paths: ['layer4.*.bn*'], position: after}\n"
        "  - {paths: ['layer4.0.bn1'], position: before, sbn: {stats: frequency}}\n"
        "  - {paths: ['layer4.1.bn2'], position: replace}\n")
    model = _model("resnet18")
    plan = sbn.apply_recipe(model, recipe, input_size=SIZE)
    by_target = {s.target: s for s in plan.sites}
    assert by_target["layer4.0.bn1"].position == "before"
    assert by_target["layer4.0.bn1"].stats == "frequency"
    assert by_target["layer4.0.bn1"].spatial_size == (2, 2)
    assert by_target["layer4.0.bn2"].position == "after"
    assert by_target["layer4.1.bn2"].module == "layer4.1.bn2"
    assert isinstance(model.layer4[1].bn2, sbn.SpectralBatchNorm2d)
    x = torch.randn(3, *SIZE)
    model.train()(x).sum().backward()
    original = _model("resnet18").state_dict()
    sbn.strip_sbn(model)
    assert type(model.layer4[1].bn2).__name__ == "BatchNorm2d"
    assert list(model.state_dict()) == list(original)


def _recorder(seen, key):
    """A forward hook or pre-hook that stores the tensor it sees (returns None: changes nothing)."""
    def hook(mod, args, out=None):
        seen[key] = (args[0] if out is None else out).clone()
    return hook


def _record_sbn(seen, layer):
    layer.register_forward_pre_hook(_recorder(seen, "sbn_in"))
    layer.register_forward_hook(_recorder(seen, "sbn_out"))


@pytest.mark.parametrize("position", ["after", "before"])
def test_hooks_a_user_registered_before_conversion_see_the_sbn_output(position):
    # SBN hooks go first (prepend), as torch.ao's observers do: a forward hook on the host sees
    # the SBN's output, a forward pre-hook sees the SBN's output as its input.
    model = _model("resnet18", zero_init_last=False)  # bn2 outputs more than zeros
    host = model.layer4[1].bn2
    seen = {}
    if position == "after":
        host.register_forward_hook(_recorder(seen, "user"))
    else:
        host.register_forward_pre_hook(_recorder(seen, "user"))
    recipe = Recipe.from_yaml_text(
        f"name: t\nrules:\n  - {{paths: ['layer4.1.bn2'], position: {position}}}\n")
    sbn.apply_recipe(model, recipe, input_size=SIZE)
    _record_sbn(seen, host.sbn)
    model.train()(torch.randn(4, *SIZE))
    assert not torch.allclose(seen["sbn_in"], seen["sbn_out"], atol=1e-3)  # SBN changed it
    assert torch.equal(seen["user"], seen["sbn_out"])


def test_a_user_hook_on_the_drop_of_a_norm_act_layer_sees_the_sbn_output():
    model = _model("efficientnet_b0")
    target = "blocks.6.0.bn3"
    drop = model.get_submodule(target).drop
    seen = {}
    drop.register_forward_pre_hook(_recorder(seen, "user"))
    recipe = Recipe.from_yaml_text(f"name: t\nrules:\n  - {{paths: ['{target}']}}\n")
    plan = sbn.apply_recipe(model, recipe, input_size=SIZE)
    assert plan.sites[0].module == target + ".drop.sbn"
    _record_sbn(seen, drop.sbn)
    model.train()(torch.randn(4, *SIZE))
    assert not torch.allclose(seen["sbn_in"], seen["sbn_out"], atol=1e-3)
    assert torch.equal(seen["user"], seen["sbn_out"])


def test_norm_act_after_means_between_norm_and_activation():
    model = _model("efficientnet_b0")
    plan = sbn.apply_recipe(model, "default", input_size=SIZE)
    site = plan.sites[0]
    assert site.module == site.target + ".drop.sbn"
    host = model.get_submodule(site.target)
    seen = {}

    def record_act_input(mod, args):
        seen.setdefault("act_in", args[0].clone())

    def record_sbn_output(mod, args, out):
        seen.setdefault("sbn_out", out.clone())

    host.act.register_forward_pre_hook(record_act_input)
    model.get_submodule(site.module).register_forward_hook(record_sbn_output)
    model.eval()(torch.randn(2, *SIZE))
    assert torch.equal(seen["act_in"], seen["sbn_out"])  # SBN output feeds the activation


@pytest.mark.parametrize("name,recipe", [("resnet50", "resnet"), ("efficientnet_b0", "default")])
@pytest.mark.parametrize("stats", ["channel", "frequency"])
@pytest.mark.slow
def test_identity_init_keeps_eval_output(name, recipe, stats):
    model = _model(name)
    randomize_norms(model, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model).eval()
    r = sbn.load_recipe(recipe)
    r = r.model_copy(update={"sbn": r.sbn.merged(type(r.sbn)(stats=stats))})
    sbn.apply_recipe(model, r, input_size=SIZE)
    sbn.calibrate(model, synthetic_batches(SIZE, 4, 2), passthrough=True)
    sbn.init_identity(model)
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        y_ref, y = reference(x), model.eval()(x)
    assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 1e-4
    # and the layers are not trivial: the calibrated statistics are the activations'
    first = model.get_submodule(sbn.find_sbn(model)[0].module)
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))


def test_standard_init_leaves_gamma_one_beta_zero():
    model, plan = sbn.convert("resnet18", "resnet", num_classes=10, input_size=SIZE,
                              init="standard", model_kwargs={"zero_init_last": False})
    for site in plan.sites:
        layer = model.get_submodule(site.module)
        assert torch.equal(layer.weight, torch.ones_like(layer.weight))
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def _zeroed_like(converted, sites):
    """The unconverted model with the converted one's weights and timm's zero-init restored."""
    plain = _model("resnet18")
    plain.load_state_dict({k: v for k, v in converted.state_dict().items() if ".sbn." not in k})
    with torch.no_grad():
        for site in sites:
            plain.get_submodule(site.target).weight.zero_()
    return plain


def test_standard_init_moves_timm_zero_init_into_sbn_keeping_the_function():
    # timm zero-inits each block's last BN; an SBN after it would undo that (unit-scale output
    # after one step). The zero moves to the SBN: same output, and SBN's gamma gets a gradient.
    torch.manual_seed(0)
    model, plan = sbn.convert("resnet18", "resnet", num_classes=10, input_size=SIZE,
                              init="standard")
    assert plan.count == 4
    for site in plan.sites:
        assert torch.equal(model.get_submodule(site.module).weight,
                           torch.zeros(site.channels))
        assert torch.equal(model.get_submodule(site.target).weight, torch.ones(site.channels))
    plain = _zeroed_like(model, plan.sites)
    x = torch.randn(4, *SIZE)
    y, y_plain = model.train()(x), plain.train()(x)
    assert torch.allclose(y, y_plain, rtol=0, atol=1e-5)
    y.square().sum().backward()
    for site in plan.sites:
        assert model.get_submodule(site.module).weight.grad.abs().sum() > 0


def test_standard_init_zero_for_a_replaced_zero_init_norm():
    recipe = Recipe.from_yaml_text(
        "name: t\nrules:\n  - {paths: ['layer4.*.bn2'], position: replace}\n")
    torch.manual_seed(0)
    model, plan = sbn.convert("resnet18", recipe, num_classes=10, input_size=SIZE,
                              init="standard")
    assert [s.module for s in plan.sites] == ["layer4.0.bn2", "layer4.1.bn2"]
    for site in plan.sites:
        layer = model.get_submodule(site.module)
        assert torch.equal(layer.weight, torch.zeros(site.channels))
    x = torch.randn(4, *SIZE)
    with torch.no_grad():  # the replaced keys are BatchNorm's, so the plain model loads them all
        y, y_plain = model.train()(x), _zeroed_like(model, []).train()(x)
    assert torch.allclose(y, y_plain, rtol=0, atol=1e-5)


def test_standard_init_moves_a_zero_groupnorm_into_sbn():
    recipe = Recipe.from_yaml_text(
        "name: t\nrules:\n  - {types: [GroupNorm], paths: ['layer4.*.bn3']}\n")
    torch.manual_seed(0)
    model, plan = sbn.convert("resnet26", recipe, num_classes=10, input_size=SIZE,
                              init="standard", model_kwargs={"norm_layer": "groupnorm"})
    assert plan.count == 2
    for site in plan.sites:
        assert type(model.get_submodule(site.target)).__name__ == "GroupNorm"
        assert not model.get_submodule(site.module).weight.any()
        assert bool((model.get_submodule(site.target).weight == 1).all())


def test_standard_init_with_a_checkpoint_leaves_its_weights_alone(tmp_path):
    net = _model("resnet18")
    with torch.no_grad():  # trained weights where a zero gamma need not mean a zero branch
        net.layer4[0].bn2.bias.fill_(0.5)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    reference = copy.deepcopy(net).eval()
    model, plan = sbn.convert("resnet18", "resnet", num_classes=10, input_size=SIZE,
                              init="standard", checkpoint=tmp_path / "r18.pth")
    for site in plan.sites:
        assert bool((model.get_submodule(site.module).weight == 1).all())
        assert not model.get_submodule(site.target).weight.any()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():  # the zero-gamma, zero-beta bn2 of layer4.1 makes its SBN see zeros
        assert torch.allclose(model.eval()(x), reference(x), atol=1e-4)


def test_identity_init_does_not_move_zero_init(tmp_path):
    net = _model("resnet18")
    ckpt = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(ckpt, tmp_path / "r18.pth")
    sbn.apply_recipe(net, "resnet", input_size=SIZE)
    assert sbn.surgery.carry_zero_init(net)  # what standard init would do...
    model, plan = sbn.convert("resnet18", "resnet", num_classes=10, input_size=SIZE,
                              checkpoint=tmp_path / "r18.pth")
    for site in plan.sites:  # ...but a trained model's weights are left as they are
        assert torch.equal(model.get_submodule(site.target).weight, ckpt[f"{site.target}.weight"])


@pytest.mark.slow
def test_converted_model_trains_deepcopies_pickles_prints_and_exports():
    model, plan = sbn.convert("resnet18", "resnet", num_classes=10, input_size=SIZE)
    x = torch.randn(2, *SIZE)
    model.train()(x).sum().backward()
    grad = model.get_submodule(plan.sites[0].module).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    y = model(x)
    assert torch.equal(copy.deepcopy(model)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), y)
    assert "SpectralBatchNorm2d(256, stats=channel" in repr(model)
    ep = torch.export.export(model, (x,))
    assert torch.allclose(ep.module()(x), y, atol=1e-5)


@pytest.mark.slow
def test_save_and_load_converted_round_trip(tmp_path):
    model, _ = sbn.convert("resnet18", "resnet", num_classes=7, input_size=(3, 32, 32),
                           init="identity")
    path = tmp_path / "m.safetensors"
    sbn.save_converted(model, path)
    loaded = sbn.load_converted(path)
    assert loaded.sbn_meta["model_name"] == "resnet18"
    assert loaded.sbn_meta["recipe_name"] == "resnet"
    assert loaded.sbn_meta["sbn_surgery_version"] == sbn.__version__
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert [s.module for s in sbn.find_sbn(loaded)] == [s.module for s in sbn.find_sbn(model)]


def test_original_pth_checkpoint_loads_with_weights_only(tmp_path):
    source = _model("resnet18")
    randomize_norms(source, torch.Generator().manual_seed(1))
    path = tmp_path / "orig.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model, _ = sbn.convert("resnet18", "resnet", checkpoint=path, num_classes=10, input_size=SIZE)
    assert model.sbn_meta["init"] == "identity"  # auto: identity when weights are loaded
    x = torch.randn(2, *SIZE)
    assert torch.allclose(model.eval()(x), source.eval()(x), atol=1e-5)


def test_checkpoint_that_does_not_fit_summarizes_keys(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(_model("resnet34").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit.*unexpected key\(s\): layer1\.2"):
        sbn.convert("resnet18", "resnet", checkpoint=path, num_classes=10, input_size=SIZE)


def test_recipe_errors_give_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrules:\n  - types: [BatchNorm2d]\n    positon: after\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:4: key 'rules.0.positon': unknown key"):
        sbn.load_recipe(bad)
    bad.write_text("name: x\nrules:\n  - types: [BatchNorm2d\n    position: after\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+: YAML syntax error"):
        sbn.load_recipe(bad)
    bad.write_text("name: x\nsbn: {stats: spectral}\nrules:\n  - types: [BatchNorm2d]\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:2: key 'sbn.stats'"):
        sbn.load_recipe(bad)
    with pytest.raises(RecipeError, match=r"no recipe named 'resnett'.*did you mean resnet"):
        sbn.load_recipe("resnett")


def test_pickles_naming_the_hooks_by_the_module_path_before_the_package_split_load(monkeypatch):
    from sbn_surgery.surgery import insert

    model = _model("resnet18")
    sbn.apply_recipe(model, "resnet", input_size=SIZE)
    for hook in (insert._sbn_after_hook, insert._sbn_before_hook):
        monkeypatch.setattr(hook, "__module__", "sbn_surgery.surgery")  # where they used to live
    loaded = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    from sbn_surgery.files import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", lambda p: open(p, "wb").write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
