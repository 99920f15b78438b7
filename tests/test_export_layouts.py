"""Export of SBN on NHWC maps and on tokens: each form against the layer (float64) per layout,
scales folded into a Linear, a convolution or a weight-standardized convolution's gain, and
ONNX parity per layout on small timm models (a ViT built with dynamic_img_size at two sizes)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.std_conv import ScaledStdConv2d
from torch import nn

import sbn_surgery as sbn
from sbn_surgery import SpectralBatchNorm2d, export_onnx
from sbn_surgery.export import prepare_export_model
from sbn_surgery.export.forms import CornerForm, build_form
from sbn_surgery.parity import check_parity
from sbn_surgery.recipe import Recipe
from sbn_surgery.surgery import synthetic_batches

C, H, W = 5, 4, 6
LAYOUTS = [("nhwc", 0), ("tokens", 0), ("tokens", 2)]
IDS = ["nhwc", "tokens", "tokens+2prefix"]


def _input(layout, p, n=3, h=H, w=W, seed=3):
    g = torch.Generator().manual_seed(seed)
    if layout == "nhwc":
        return torch.randn(n, h, w, C, generator=g, dtype=torch.float64) * 2 + 0.3
    return torch.randn(n, p + h * w, C, generator=g, dtype=torch.float64) * 2 + 0.3


def _calibrated(stats, layout, p, seed=0):
    """An eval-mode SBN on ``layout`` with non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    layer = SpectralBatchNorm2d(C, stats=stats, momentum=None, layout=layout, prefix_tokens=p,
                                grid=(H, W) if layout == "tokens" else None,
                                spatial_size=(H, W) if stats == "frequency" else None).double()
    for i in range(3):
        layer(_input(layout, p, n=4, seed=10 + i))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.normal_(0.0, 0.5, generator=g)
    return layer.eval()


@pytest.mark.parametrize("layout,p", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("stats", ["channel", "frequency"])
@pytest.mark.parametrize("mode,mm", [("fold", "auto"), ("dft", "auto"), ("matmul", "dense"),
                                     ("matmul", "separable")])
def test_form_equals_layer_per_layout(layout, p, stats, mode, mm):
    layer = _calibrated(stats, layout, p)
    x = _input(layout, p)
    ref = layer(x)
    form = build_form(layer, "site", mode, (H, W), layout=mm)
    got = form(x.float()).double()
    assert got.shape == ref.shape
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    if p:  # the prefix tokens: the layer's gain, no shift
        assert ((got[:, :p] - ref[:, :p]).abs().max() / ref[:, :p].abs().max()).item() <= 1e-6


@pytest.mark.parametrize("layout,p", LAYOUTS, ids=IDS)
def test_channel_forms_of_tokens_and_nhwc_take_any_size(layout, p):
    layer = _calibrated("channel", layout, p)
    for mode in ("fold", "dft"):
        form = build_form(layer, "s", mode, (H, W))
        x = _input(layout, p, h=7, w=3)  # another grid (another input size)
        ref = layer(x)
        assert ((form(x.float()).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-6


class _Front(nn.Module):
    """An image in 4x4 patches (a 4x6 grid at 16x24), laid out as ``layout`` (with ``p`` prefix
    tokens), then the layer in front of the SBN."""

    def __init__(self, layout, p, front):
        super().__init__()
        self.layout, self.num_prefix_tokens = layout, p
        self.register_buffer("prefix", torch.randn(1, p, 3) * 2)
        self.front = {"linear": lambda: nn.Linear(3, C), "conv": lambda: nn.Conv2d(3, C, 3, padding=1),
                      "gain": lambda: ScaledStdConv2d(3, C, 3, padding=1)}[front]()

    def forward(self, img):
        maps = nn.functional.avg_pool2d(img, 4)
        if self.layout == "nchw":
            return self.front(maps)
        t = maps.permute(0, 2, 3, 1)
        if self.layout == "tokens":
            t = torch.cat([self.prefix.expand(t.shape[0], -1, -1), t.flatten(1, 2)], 1)
        return self.front(t)


@pytest.mark.parametrize("layout,p,front", [("tokens", 2, "linear"), ("nhwc", 0, "linear"),
                                            ("nchw", 0, "conv"), ("nchw", 0, "gain")])
def test_a_channel_scale_folds_exactly_into_the_layer_in_front(layout, p, front):
    torch.manual_seed(0)
    model = _Front(layout, p, front)
    size = (3, 16, 24)
    plan = sbn.apply_recipe(model, Recipe(name="t", rules=[{"paths": ["front"]}]), input_size=size)
    site = plan.sites[0]
    assert (site.layout, site.prefix_tokens, site.fold_into) == (layout, p, "front")
    sbn.calibrate(model, [torch.randn(4, *size) * 2 + 0.5, torch.randn(4, *size)])
    with torch.no_grad():
        model.front.sbn.weight.uniform_(0.5, 1.5)
        model.front.sbn.bias.normal_()
    img = torch.randn(3, *size)
    ref = model.eval()(img)
    work, records = prepare_export_model(model, "fold", size)
    assert records[0].folded_into == "front" and records[0].map_layout == layout
    form = work.get_submodule("front.sbn")
    assert isinstance(form, CornerForm) and form.scale is None
    assert torch.allclose(work(img), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(model(img), ref)  # the caller's model is not touched


def _converted(name, kwargs, side, stats="channel"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and not head.weight.any():  # timm zero-inits some heads
        nn.init.normal_(head.weight, std=0.02)
    recipe = Recipe.from_yaml_text(sbn.load_recipe(sbn.recipe.recipe_for_model(name)).text
                                   .replace("stats: channel", f"stats: {stats}"))
    plan = sbn.apply_recipe(model, recipe, input_size=(3, side, side))
    sbn.calibrate(model, synthetic_batches((3, side, side), 4, 2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in plan.sites:
            layer = model.get_submodule(site.module)
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.normal_(0.0, 0.3, generator=g)
    return model.eval(), plan


# small members of a family per layout: (model, kwargs, input side)
MODELS = {
    "tokens": ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 4}, 64),
    "nhwc": ("mambaout_femto", {"depths": (1, 1, 2, 1)}, 64),
    "nchw": ("nf_resnet26", {}, 64),
}


@pytest.mark.parametrize("layout", sorted(MODELS))
@pytest.mark.parametrize("mode,stats", [("fold", "channel"), ("matmul", "frequency"),
                                        ("dft", "channel")])
@pytest.mark.slow
def test_onnx_parity_per_layout(tmp_path, layout, mode, stats):
    name, kwargs, side = MODELS[layout]
    model, plan = _converted(name, kwargs, side, stats)
    assert {s.layout for s in plan.sites} == {layout}
    result = export_onnx(model, tmp_path / "m.onnx", mode=mode, input_size=(3, side, side))
    assert result.parity.passed, result.parity.describe()
    assert result.parity.top1_agreement == 1.0
    assert {s.map_layout for s in result.sites} == {layout}
    if mode == "fold":
        assert all(s.folded_into == p.fold_into is not None for s, p in zip(result.sites, plan.sites))
    layers = check_parity(tmp_path / "m.onnx", model, per_layer=True).layers
    assert layers and all(lay.passed for lay in layers), layers


@pytest.mark.slow
def test_a_dynamic_img_size_vit_exports_in_fold_mode_for_any_size(tmp_path):
    model, plan = _converted("vit_tiny_patch16_224", {"img_size": 64, "depth": 4,
                                                       "dynamic_img_size": True}, 64)
    result = export_onnx(model, tmp_path / "vit.onnx", mode="fold", input_size=(3, 64, 64))
    assert result.dynamic_size and result.parity.passed, result.parity.describe()
    # parity at the export size and at 96x96 (other_sizes: 32 more pixels each way)
    assert {c.shape[-1] for c in result.parity.cases} == {64, 96}
    report = check_parity(tmp_path / "vit.onnx", copy.deepcopy(model),
                          other_sizes=[(128, 80)])
    assert report.passed and {c.shape[-1] for c in report.cases} == {64, 80}
