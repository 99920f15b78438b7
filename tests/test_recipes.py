"""The shipped family recipes, each on a small model of its family.

Expected sites are written out from each architecture (block counts per stage, which norm closes a
block), not taken from a run of the rewriter.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import randomize_norms

import sbn_surgery as sbn
from sbn_surgery.errors import RecipeError, SurgeryError
from sbn_surgery.recipe import Recipe, recipe_for_model, shipped_recipes
from sbn_surgery.surgery import synthetic_batches

SIZE = (3, 64, 64)


def _norm_act(paths):
    # "after" a fused norm+act: the SBN lives in the module's drop child
    return [p + ".drop.sbn" for p in paths]


def _plain(paths):
    return [p + ".sbn" for p in paths]


# family -> (model, model kwargs, expected targets, how SBN paths are formed from targets)
CASES = {
    # ResNet-26-D: bottlenecks, depths (2, 2, 2, 2); bn3 closes each block of layer3 and layer4
    "resnet": ("resnet26d", {}, [f"layer{s}.{b}.bn3" for s in (3, 4) for b in (0, 1)], _plain),
    # SK-ResNet-18: basic blocks (2, 2, 2, 2); conv2.bn closes the block
    "sknet": ("skresnet18", {}, [f"layer{s}.{b}.conv2.bn" for s in (3, 4) for b in (0, 1)],
              _norm_act),
    # RegNetX-200MF: stage depths (1, 1, 4, 7); blocks are named b1.., conv3.bn closes a block
    "regnet": ("regnetx_002", {},
               [f"s3.b{b}.conv3.bn" for b in range(1, 5)]
               + [f"s4.b{b}.conv3.bn" for b in range(1, 8)], _norm_act),
    # MobileNetV3-Small: feature points blocks.1 / blocks.3 / blocks.5, so the last two stages
    # are blocks.2-3 (3 + 2 inverted residuals, bn3) and blocks.4-5 (3 inverted residuals, then
    # one 1x1 conv block whose only norm is bn1)
    "efficientnet": ("mobilenetv3_small_050", {},
                     [f"blocks.2.{i}.bn3" for i in range(3)] + [f"blocks.3.{i}.bn3" for i in range(2)]
                     + [f"blocks.4.{i}.bn3" for i in range(3)] + ["blocks.5.0.bn1"], _norm_act),
    # DenseNet-121: dense blocks of (6, 12, 24, 16) layers; norm2 of denseblock3 and denseblock4
    "densenet": ("densenet121", {},
                 [f"features.denseblock3.denselayer{i}.norm2" for i in range(1, 25)]
                 + [f"features.denseblock4.denselayer{i}.norm2" for i in range(1, 17)], _norm_act),
    # VGG-11-BN: features = conv,bn,relu per conv and a pool per block: convs 64 | 128 | 256 256 |
    # 512 512 | 512 512. The two 512-channel blocks hold the BNs at 16, 19 and 23, 26. A small
    # pre-logits MLP keeps the test light.
    "vgg": ("vgg11_bn", {"mlp_ratio": 0.0625}, ["features.16", "features.19", "features.23",
                                                 "features.26"], _plain),
    # DLA-46-C: level4 is a two-level tree of 4 bottlenecks, level5 a tree of 2; bn3 closes each
    "dla": ("dla46_c", {},
            [f"level4.tree{a}.tree{b}.bn3" for a in (1, 2) for b in (1, 2)]
            + ["level5.tree1.bn3", "level5.tree2.bn3"], _plain),
    # DarkNet-17: stages of (1, 1, 1, 1, 1) dark blocks (conv1 1x1, conv2 3x3); conv2.bn closes
    # the block; the last two stages are stages.3 and stages.4
    "cspnet": ("darknet17", {}, ["stages.3.blocks.0.conv2.bn", "stages.4.blocks.0.conv2.bn"],
               _norm_act),
    # GhostNet-0.5: feature points blocks.5 and blocks.7; bottlenecks blocks.4.0, blocks.5.0 and
    # blocks.6.0-4, blocks.7.0
    "ghostnet": ("ghostnet_050", {},
                 ["blocks.4.0.ghost2", "blocks.5.0.ghost2"]
                 + [f"blocks.6.{i}.ghost2" for i in range(5)] + ["blocks.7.0.ghost2"], _plain),
    # ReXNet-1.0: 16 feature modules, feature points at features.10 and features.15
    "rexnet": ("rexnet_100", {}, [f"features.{i}.conv_pwl.bn" for i in range(5, 16)], _norm_act),
    # ConvNeXt-Atto: depths (2, 2, 6, 2)
    "convnext": ("convnext_atto", {},
                 [f"stages.2.blocks.{i}.conv_dw" for i in range(6)]
                 + [f"stages.3.blocks.{i}.conv_dw" for i in range(2)], _plain),
    # Families without BatchNorm, their maps in every layout. ViT-Tiny: 12 blocks, each a
    # feature stage; the deeper half end their MLP branch with mlp.fc2 (tokens, class token)
    "vit": ("vit_tiny_patch16_224", {"img_size": 64},
            [f"blocks.{i}.mlp.fc2" for i in range(6, 12)], _plain),
    # Swin-T: depths (2, 2, 6, 2); the MLP runs on tokens (N, H*W, C)
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 112},
             [f"layers.2.blocks.{i}.mlp.fc2" for i in range(6)]
             + [f"layers.3.blocks.{i}.mlp.fc2" for i in range(2)], _plain),
    # NF-ResNet-26: bottlenecks (2, 2, 2, 2), conv3 ends each branch (NCHW)
    "nfnet": ("nf_resnet26", {}, [f"stages.{s}.{b}.conv3" for s in (2, 3) for b in (0, 1)],
              _plain),
    # EdgeNeXt-XX-Small: depths (2, 2, 6, 2); the MLP runs channels-last (N, H, W, C)
    "edgenext": ("edgenext_xx_small", {},
                 [f"stages.2.blocks.{i}.mlp.fc2" for i in range(6)]
                 + [f"stages.3.blocks.{i}.mlp.fc2" for i in range(2)], _plain),
    # PoolFormer-S12: depths (2, 2, 6, 2); a 1x1-conv MLP on NCHW maps
    "metaformer": ("poolformer_s12", {},
                   [f"stages.2.blocks.{i}.mlp.fc2" for i in range(6)]
                   + [f"stages.3.blocks.{i}.mlp.fc2" for i in range(2)], _plain),
    # MambaOut-Femto: depths (3, 3, 9, 3), channels-last gated conv blocks ending with fc2
    "mambaout": ("mambaout_femto", {},
                 [f"stages.2.blocks.{i}.fc2" for i in range(9)]
                 + [f"stages.3.blocks.{i}.fc2" for i in range(3)], _plain),
    # PVT-v2-B0: depths (2, 2, 2, 2); tokens (N, H*W, C)
    "pvt_v2": ("pvt_v2_b0", {}, [f"stages.{s}.blocks.{b}.mlp.fc2" for s in (2, 3) for b in (0, 1)],
               _plain),
    # Mixer-S/16: 8 blocks, each a feature stage; tokens (N, H*W, C)
    "mlp_mixer": ("mixer_s16_224", {"img_size": 64},
                  [f"blocks.{i}.mlp_channels.fc2" for i in range(4, 8)], _plain),
}
#: input sizes other than SIZE (Swin's window of 7 needs a grid of a multiple of 7)
SIZES = {"swin": (3, 112, 112)}


pytestmark = pytest.mark.usefixtures("one_thread")


#: Recipes without ``models`` patterns: chosen by name only, never by recipe_for_model (none
#: inserts no SBN: the baseline).
GENERAL = {"default", "resnet-every-block", "none"}


def test_every_family_recipe_has_a_case_here():
    assert set(shipped_recipes()) - GENERAL == set(CASES)


def test_resnet_every_block_puts_sbn_after_the_last_norm_of_all_blocks():
    model = timm.create_model("resnet18", pretrained=False)
    plan = sbn.apply_recipe(model, "resnet-every-block", input_size=(3, 32, 32))
    assert [s.target for s in plan.sites] == [f"layer{s}.{b}.bn2" for s in (1, 2, 3, 4)
                                              for b in (0, 1)]
    assert recipe_for_model("resnet18") == "resnet"


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.slow
def test_family_recipe_on_a_small_model(family):
    name, kwargs, targets, site_path = CASES[family]
    size = SIZES.get(family, SIZE)
    assert recipe_for_model(name) == family
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    randomize_norms(model, torch.Generator().manual_seed(1))
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():
        # timm zero-initializes some heads (MLP-Mixer); a trained one is not zero
        torch.nn.init.normal_(head.weight, std=0.02, generator=torch.Generator().manual_seed(2))
    original = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()

    plan = sbn.apply_recipe(model, family, input_size=size)

    # sites are what the recipe says
    assert [s.target for s in plan.sites] == targets
    assert [s.module for s in plan.sites] == site_path(targets)
    assert plan.count == len(targets)
    assert plan.params_added == 2 * sum(s.channels for s in plan.sites)

    # the original state_dict loads strictly apart from the new SBN keys
    assert set(model.state_dict()) - set(original) == set(plan.new_keys())
    result = model.load_state_dict(original, strict=False)
    assert sorted(result.missing_keys) == sorted(plan.new_keys())
    assert not result.unexpected_keys

    # forward and backward (on a copy: a training step moves the BatchNorm statistics)
    trained = copy.deepcopy(model).train()
    x = torch.randn(2, *size)
    trained(x).square().mean().backward()
    for site in plan.sites:
        layer = trained.get_submodule(site.module)
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        assert int(layer.num_batches_tracked) == 1

    # identity init keeps the eval output
    sbn.calibrate(model, synthetic_batches(size, 4, 2), passthrough=True)
    sbn.init_identity(model)
    model.eval()
    with torch.no_grad():
        y_ref, y = reference(x), model(x)
    assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 1e-4
    first = model.get_submodule(plan.sites[0].module)
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))

    # torch.export
    exported = torch.export.export(model, (x,)).module()
    assert torch.allclose(exported(x), y, atol=1e-5, rtol=1e-4)

    # strip gives back the original state_dict
    sbn.strip_sbn(model)
    stripped = model.state_dict()
    assert list(stripped) == list(original)
    assert all(torch.equal(stripped[k], original[k]) for k in original)


@pytest.mark.parametrize("name,family", [
    ("resnet50", "resnet"), ("resnet50d.a1_in1k", "resnet"), ("seresnext26d_32x4d", "resnet"),
    ("wide_resnet50_2", "resnet"), ("legacy_seresnet18", "resnet"), ("res2net50d", "resnet"),
    ("resnest14d", "resnet"), ("skresnext50_32x4d", "sknet"), ("regnety_040", "regnet"),
    ("regnetv_040", "regnet"), ("efficientnet_b0", "efficientnet"),
    ("tf_efficientnetv2_s", "efficientnet"), ("mnasnet_100", "efficientnet"),
    ("mobilenetv3_large_100", "efficientnet"), ("hardcorenas_a", "efficientnet"),
    ("densenet121", "densenet"), ("vgg16_bn", "vgg"), ("dla60x", "dla"),
    ("cspresnet50", "cspnet"), ("cs3darknet_s", "cspnet"), ("darknet53", "cspnet"),
    ("ghostnetv2_100", "ghostnet"), ("rexnetr_100", "rexnet"), ("convnextv2_atto", "convnext"),
    # same prefixes, other timm modules with other module names: default
    ("resnet33ts", "default"), ("resnet50_clip", "default"), ("resnetv2_50", "default"),
    ("regnetz_b16", "default"), ("cspnext_s", "default"), ("vgg16", "default"),
    ("mobilenetv4_conv_small", "default"), ("vit_small_patch16_224", "vit"),
    ("deit_tiny_distilled_patch16_224", "vit"), ("eva02_tiny_patch14_224", "vit"),
    ("beitv2_base_patch16_224", "vit"), ("vitamin_small_224", "default"),
    ("swin_tiny_patch4_window7_224", "swin"), ("swinv2_tiny_window8_256", "default"),
    ("dm_nfnet_f0", "nfnet"), ("nf_regnet_b1", "nfnet"), ("eca_nfnet_l0", "nfnet"),
    ("edgenext_xx_small", "edgenext"), ("poolformerv2_s12", "metaformer"),
    ("convformer_s18", "metaformer"), ("caformer_s18", "metaformer"),
    ("mambaout_femto", "mambaout"), ("pvt_v2_b0", "pvt_v2"), ("mixer_s16_224", "mlp_mixer"),
    ("resmlp_12_224", "mlp_mixer"), ("gmlp_s16_224", "mlp_mixer"),
    ("regnetz_040_h", "regnet"),
    # GroupNorm variants have no BatchNorm for the family rule to find
    ("efficientnet_b0_gn", "default"), ("regnety_040_sgn", "default"), ("resnet50_gn", "default"),
])
def test_recipe_for_model_picks_the_family(name, family):
    assert recipe_for_model(name) == family


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


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_say_why_and_catch_drift(name):
    recipe = sbn.load_recipe(name)
    assert len(recipe.description.split()) >= 30  # the reason for its sites
    assert all(rule.expect is not None for rule in recipe.rules)
    assert (recipe.models == []) == (name in GENERAL)
