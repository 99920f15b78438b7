"""The shipped family recipes, each on a small model of its family."""

from __future__ import annotations

import pytest
import timm

import sbn_surgery as sbn
from sbn_surgery.errors import RecipeError, SurgeryError
from sbn_surgery.recipe import Recipe


def test_last_in_parent_levels_groups_by_the_ancestor():
    # layer4 of resnet18: blocks 0 and 1 with bn1, bn2, and a downsample (conv, bn) in block 0.
    # Grouped two levels up, block norms group under "layer4" (last: layer4.1.bn2) and the
    # downsample norm under "layer4.0".
    text = ("name: t\nrules:\n  - types: [BatchNorm2d]\n    paths: ['layer4.*']\n"
            "    last_in_parent: {}\n")
    plans = {}
    for levels in ("true", "2"):
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        plan = sbn.apply_recipe(model, Recipe.from_yaml_text(text.format(levels)),
                                input_size=(3, 32, 32))
        plans[levels] = [s.target for s in plan.sites]
    assert plans["true"] == ["layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn2"]
    assert plans["2"] == ["layer4.0.downsample.1", "layer4.1.bn2"]
    with pytest.raises(RecipeError, match=r"t.yaml:5: key 'rules.0.last_in_parent'"):
        Recipe.from_yaml_text(text.format("-1"), source="t.yaml")


def test_deepest_stages_counts_only_stages_the_rule_reaches():
    # vgg11_bn: BatchNorms at features.1 | 5 | 9, 12 | 16, 19 | 23, 26; the last feature stage
    # holds only the final max-pool, so stages [-2, -1] reach one conv block and
    # deepest_stages: 2 the two deepest blocks that have a BatchNorm.
    text = "name: t\nrules:\n  - types: [BatchNorm2d]\n    {}\n"
    targets = {}
    for key, sel in (("last", "stages: [-2, -1]"), ("deepest", "deepest_stages: 2")):
        model = timm.create_model("vgg11_bn", pretrained=False, num_classes=10, mlp_ratio=0.0625)
        plan = sbn.apply_recipe(model, Recipe.from_yaml_text(text.format(sel)),
                                input_size=(3, 32, 32))
        targets[key] = [s.target for s in plan.sites]
    assert targets["last"] == ["features.23", "features.26"]
    assert targets["deepest"] == ["features.16", "features.19", "features.23", "features.26"]
    with pytest.raises(RecipeError, match=r"t.yaml:3: key 'rules.0'.*not both"):
        Recipe.from_yaml_text(text.format("stages: [-1]\n    deepest_stages: 1"), source="t.yaml")


def test_a_failed_apply_leaves_the_model_unchanged():
    # layer4.1.bn2 comes before fc in module order: its SBN is inserted, then fc's 2-D output
    # fails; the model must be as before, so the user can fix the recipe and apply again.
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    keys = list(model.state_dict())
    bad = Recipe.from_yaml_text("name: t\nrules:\n  - paths: ['layer4.1.bn2', 'fc']\n")
    with pytest.raises(SurgeryError, match=r"fc \(Linear\), whose output has shape \(1, 10\)"):
        sbn.apply_recipe(model, bad, input_size=(3, 32, 32))
    assert not sbn.find_sbn(model)
    assert list(model.state_dict()) == keys
    assert not model.layer4[1].bn2._forward_hooks
    plan = sbn.apply_recipe(model, "resnet", input_size=(3, 32, 32))
    assert plan.count == 4


def test_models_patterns_take_regexes_and_ignore_pretrained_tags():
    recipe = Recipe.from_yaml_text(
        "name: t\nmodels: ['re:resnet\\d+[d]?', 'vgg*_bn']\nrules:\n  - types: [BatchNorm2d]\n")
    assert recipe.fits_model("resnet50") and recipe.fits_model("resnet50d.a1_in1k")
    assert recipe.fits_model("vgg11_bn.tv_in1k")
    assert not recipe.fits_model("resnet33ts") and not recipe.fits_model("resnetv2_50")
    with pytest.raises(RecipeError, match=r"t.yaml:2: key 'models'.*bad regular expression"):
        Recipe.from_yaml_text("name: t\nmodels: ['re:res(']\nrules:\n  - types: [BatchNorm2d]\n",
                              source="t.yaml")
