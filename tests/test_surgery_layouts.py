"""Surgery on maps in every layout: the layout found from the probe forward and checked against
the model's grid, a rule's ``layout``, the end of each residual branch, the ``default`` recipe's
fallback, refusing a model with no 2-D map, and converted token models at other input sizes."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import sbn_surgery as sbn
from sbn_surgery.errors import RecipeError, SurgeryError
from sbn_surgery.recipe import Recipe
from sbn_surgery.surgery import synthetic_batches
from sbn_surgery.surgery.branches import branch_ends
from sbn_surgery.surgery.match import _probe
from sbn_surgery.surgery.plan import fold_kind

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and not head.weight.any():  # timm zero-inits some heads
        nn.init.normal_(head.weight, std=0.02)
    return model


def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw)


# model, kwargs, input size -> (layout, prefix tokens, grid of the first site, its fold target's
# class): what each architecture holds at the end of a residual branch, read from its code
FAMILIES = {
    "vit_tiny_patch16_224": ({"img_size": 64}, 64, ("tokens", 1, (4, 4), "Linear")),
    "deit_tiny_distilled_patch16_224": ({"img_size": 64}, 64, ("tokens", 2, (4, 4), "Linear")),
    "eva02_tiny_patch14_224": ({"img_size": 56}, 56, ("tokens", 1, (4, 4), "Linear")),
    "swin_tiny_patch4_window7_224": ({"img_size": 112}, 112, ("tokens", 0, (7, 7), "Linear")),
    "pvt_v2_b0": ({}, 64, ("tokens", 0, (4, 4), "Linear")),
    "mixer_s16_224": ({"img_size": 64}, 64, ("tokens", 0, (4, 4), "Linear")),
    "mambaout_femto": ({}, 64, ("nhwc", 0, (4, 4), "Linear")),
    "edgenext_xx_small": ({}, 64, ("nhwc", 0, (4, 4), "Linear")),
    "poolformer_s12": ({}, 64, ("nchw", 0, (4, 4), "Conv2d")),
    "nf_resnet26": ({}, 64, ("nchw", 0, (4, 4), "ScaledStdConv2d")),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_layout_is_found_from_the_probe_and_the_grid(name):
    kwargs, side, (layout, prefix, grid, fold_type) = FAMILIES[name]
    model = _meta(name, **kwargs)
    plan = sbn.apply_recipe(model, sbn.recipe.recipe_for_model(name), input_size=(3, side, side))
    assert plan.count >= 2
    first = plan.sites[0]
    assert (first.layout, first.prefix_tokens, first.spatial_size) == (layout, prefix, grid)
    assert {s.layout for s in plan.sites} == {layout}
    assert type(model.get_submodule(first.fold_into)).__name__ == fold_type
    layer = model.get_submodule(first.module)
    assert (layer.layout, layer.prefix_tokens) == (layout, prefix)
    assert layer.grid == (grid if layout == "tokens" else None)
    assert plan.to_json()["sites"][0]["layout"] == layout


class _ChannelsLast(nn.Module):
    """conv (8 channels, stride 4) then a channels-last map through a parameter-free module:
    at 32x32 the map is (N, 8, 8, 8), NCHW and NHWC alike."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Identity()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.mix(self.conv(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


def test_an_ambiguous_map_asks_for_the_layout_and_a_stated_one_is_used():
    text = "name: t\nrules:\n  - paths: [mix]\n{}"
    with pytest.raises(SurgeryError, match=r"mix \(Identity\), whose output has shape "
                                           r"\(1, 8, 8, 8\): it can be NCHW or NHWC.*layout: nhwc"):
        sbn.apply_recipe(_ChannelsLast(), Recipe.from_yaml_text(text.format("")),
                         input_size=(3, 32, 32))
    model = _ChannelsLast()
    x = torch.randn(4, 3, 32, 32)
    plan = sbn.apply_recipe(model, Recipe.from_yaml_text(text.format("    layout: nhwc\n")),
                            input_size=(3, 32, 32))
    assert plan.sites[0].layout == "nhwc" and plan.sites[0].fold_into is None
    model.train()(x)
    # the SBN saw the channels-last map: its statistics are the conv output's, per channel
    conv = model.conv(x)
    assert torch.allclose(model.mix.sbn.running_var,
                          0.9 + 0.1 * _channel_var(conv), atol=1e-5)


def _channel_var(maps):
    """Channel-mode SBN's unbiased batch variance of an NCHW batch (docs/sbn.md)."""
    n, _, h, w = maps.shape
    mu = maps[:, :, 0, 0].mean(0) / (h * w) ** 0.5
    var = maps.square().mean((0, 2, 3)) - mu.square()
    return var * (n * h * w) / (n * h * w - 1)


@pytest.mark.parametrize("text,match", [
    ("  - paths: [mix]\n    layout: nwhc\n", r"t.yaml:4: key 'rules.0.layout'.*'nchw', 'nhwc' or 'tokens'"),
    ("  - paths: [mix]\n    deepest_fraction: 1.5\n", r"t.yaml:4: key 'rules.0.deepest_fraction'"),
    ("  - branch_end: true\n    fallback: true\n", r"t.yaml:2: key 'rules'.*rule 1 is a fallback.*none comes before it"),
    ("  - paths: [mix]\n    stages: [-1]\n    deepest_fraction: 0.5\n", r"not both 'stages' and"),
])
def test_new_rule_keys_are_validated_with_file_and_line(text, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml_text("name: t\nrules:\n" + text, source="t.yaml")


def test_a_stated_layout_the_map_does_not_have_is_refused():
    recipe = Recipe.from_yaml_text("name: t\nrules:\n  - paths: [conv]\n    layout: tokens\n")
    with pytest.raises(SurgeryError, match=r"conv \(Conv2d\), whose output has shape "
                                           r"\(1, 8, 8, 8\): it is not tokens"):
        sbn.apply_recipe(_ChannelsLast(), recipe, input_size=(3, 32, 32))


def test_a_model_with_no_spatial_map_gets_one_clear_line():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    for recipe in ("default", "resnet-every-block"):
        with pytest.raises(SurgeryError, match=r"^no 2-D feature map in Sequential at input size "
                                               r"3x8x8: .*nowhere to put it") as info:
            sbn.apply_recipe(mlp, recipe, input_size=(3, 8, 8))
        assert "\n" not in str(info.value) and "rule 1" not in str(info.value)


def test_tokens_that_lie_on_no_grid_are_refused_naming_the_grids():
    class Flat(nn.Module):  # a map, then 40 tokens: a 32x32 input's grids have 1024, 256, 64,
        def __init__(self):  # 16, 4 or 1 cells, none of them 40 minus 0 to 8 prefix tokens
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 6)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(2)[..., :40].transpose(1, 2)).mean(1)

    with pytest.raises(SurgeryError, match=r"fc \(Linear\), whose output has shape \(1, 40, 6\): "
                                           r"its 40 tokens are not P \+ H\*W for a grid"):
        sbn.apply_recipe(Flat(), Recipe(name="t", rules=[{"paths": ["fc"]}]),
                         input_size=(3, 32, 32))


@pytest.mark.parametrize("name,kwargs,ends", [
    ("resnet18", {}, {"layer4.1": "layer4.1.bn2"}),
    ("nf_resnet26", {}, {"stages.3.1": "stages.3.1.conv3"}),  # not the SE/1x1 layers
    ("poolformer_s12", {}, {"stages.3.blocks.1": "stages.3.blocks.1.mlp.fc2"}),  # not layer_scale2
    ("convnext_atto", {}, {"stages.3.blocks.1": "stages.3.blocks.1.mlp.fc2"}),  # not its gamma
    ("mambaout_femto", {}, {"stages.3.blocks.2": "stages.3.blocks.2.fc2"}),
    ("swin_tiny_patch4_window7_224", {"img_size": 112}, {"layers.3.blocks.1": "layers.3.blocks.1.mlp.fc2"}),
    ("vit_tiny_patch16_224", {"img_size": 64}, {"blocks.11": "blocks.11.mlp.fc2"}),
])
def test_branch_ends_are_the_last_weighted_layer_before_scales(name, kwargs, ends):
    model = _meta(name, **kwargs)
    found = branch_ends(model, _probe(model, (3, 112, 112) if "swin" in name else (3, 64, 64)))
    for block, end in ends.items():
        assert found[block] == end


def test_default_takes_batchnorms_where_there_are_and_branch_ends_otherwise():
    plan = sbn.apply_recipe(_meta("resnet18"), "default", input_size=(3, 64, 64))
    assert {s.rule for s in plan.sites} == {"every-bn-in-deep-stages"}
    plan = sbn.apply_recipe(_meta("vit_tiny_patch16_224", img_size=64), "default",
                            input_size=(3, 64, 64))
    assert [s.target for s in plan.sites] == ["blocks.10.mlp.fc2", "blocks.11.mlp.fc2"]
    assert {s.rule for s in plan.sites} == {"residual-branch-ends-in-deep-stages"}


def test_deepest_fraction_rounds_up():
    recipe = Recipe(name="t", rules=[{"paths": ["re:blocks\\.\\d+\\.mlp\\.fc2"],
                                      "deepest_fraction": 0.2}])
    plan = sbn.apply_recipe(_meta("vit_tiny_patch16_224", img_size=64), recipe,
                            input_size=(3, 64, 64))
    assert [s.target for s in plan.sites] == [f"blocks.{i}.mlp.fc2" for i in (9, 10, 11)]


def test_fold_kind_only_where_a_channel_scale_is_exact():
    from timm.layers.std_conv import ScaledStdConv2d, StdConv2d

    assert fold_kind(nn.Linear(4, 4), "tokens") == fold_kind(nn.Linear(4, 4), "nhwc") == "linear"
    assert fold_kind(nn.Linear(4, 4), "nchw") is None  # its channels are the last axis
    assert fold_kind(nn.Conv2d(4, 4, 3), "nchw") == "conv"
    assert fold_kind(nn.Conv2d(4, 4, 3), "nhwc") is None
    assert fold_kind(ScaledStdConv2d(4, 4, 3), "nchw") == "gain"
    assert fold_kind(StdConv2d(4, 4, 3), "nchw") is None  # standardization undoes a scale
    assert fold_kind(nn.BatchNorm2d(4), "nchw") == "bn"
    assert fold_kind(nn.BatchNorm2d(4, affine=False), "nchw") is None
    assert fold_kind(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), "tokens") is None


def test_identity_init_on_tokens_keeps_the_eval_output():
    model = _model("deit_tiny_distilled_patch16_224", img_size=64)
    reference = copy.deepcopy(model).eval()
    sbn.apply_recipe(model, "vit", input_size=(3, 64, 64))
    sbn.calibrate(model, synthetic_batches((3, 64, 64), 4, 2), passthrough=True)
    sbn.init_identity(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        y, y_ref = model.eval()(x), reference(x)
    assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 1e-4
    layer = model.get_submodule(sbn.find_sbn(model)[0].module)
    assert not torch.allclose(layer.running_var, torch.ones_like(layer.running_var))


@pytest.mark.parametrize("stats", ["channel", "frequency"])
def test_a_dynamic_img_size_token_model_works_at_another_input_size(stats, tmp_path):
    kwargs = {"dynamic_img_size": True}
    recipe = Recipe.from_yaml_text(sbn.load_recipe("vit").text.replace(
        "stats: channel", f"stats: {stats}"))
    model, plan = sbn.convert("vit_tiny_patch16_224", recipe, num_classes=10, model_kwargs=kwargs,
                              input_size=(3, 64, 64), init="identity", force=True)
    reference = _model("vit_tiny_patch16_224", **kwargs).eval()
    reference.load_state_dict(sbn.strip_sbn(copy.deepcopy(model)).state_dict())
    for side in (64, 96):
        x = torch.randn(2, 3, side, side)
        if stats == "frequency" and side != 64:
            with pytest.raises(ValueError, match=r"36 patch tokens.*4x4 grid"):
                model.eval()(x)
            continue
        with torch.no_grad():
            y, y_ref = model.eval()(x), reference(x)
        # identity init holds at both sizes: channel mode does not depend on the grid
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 1e-4
        copy.deepcopy(model).train()(x).square().mean().backward()  # a training step runs
    path = tmp_path / "vit.safetensors"
    sbn.save_converted(model, path)
    loaded = sbn.load_converted(path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert [(s.layout, s.prefix_tokens) for s in sbn.find_sbn(loaded)] == [("tokens", 1)] * 6


@pytest.mark.parametrize("name,rule,layout,prefix", [
    ("pit_ti_224", "residual-branch-ends-in-deep-stages", "tokens", 1),  # no num_prefix_tokens
    ("coat_lite_tiny", "residual-branch-ends-in-deep-stages", "tokens", 1),  # no feature_info
    ("vgg11", "every-conv-in-deep-stages", "nchw", 0),  # neither BatchNorm nor residual blocks
])
def test_default_reaches_models_that_say_less(name, rule, layout, prefix):
    model = _meta(name)
    plan = sbn.apply_recipe(model, "default", input_size=(3, 224, 224))
    assert plan.count >= 1 and {s.rule for s in plan.sites} == {rule}
    assert {(s.layout, s.prefix_tokens) for s in plan.sites} == {(layout, prefix)}
