"""export_onnx on whole timm models from four families, in every mode, with channel- and
frequency-mode SBN layers at odd feature sizes (7x7, 7x8, 14x15); parity at batch 1 and 3 in
float32, for the output and for every SBN layer's own output."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from conftest import ARCHS, converted

from sbn_surgery import export_onnx
from sbn_surgery.errors import ExportError
from sbn_surgery.export import NODE_PREFIX, read_metadata
from sbn_surgery.parity import check_parity, session

EXPECTED_SIZES = {
    "resnet10t": {(14, 15), (7, 8)}, "lcnet_035": {(7, 7)},
    "regnetx_002": {(14, 15), (7, 8)}, "vgg11_bn": {(14, 15), (7, 7)},
}
TOL = {"dft": 1e-4, "matmul": 1e-5, "fold": 1e-5}


@pytest.mark.parametrize("mode", ["fold", "matmul", "dft"])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.slow
def test_parity(tmp_path, arch, mode):
    model, plan, size = converted(arch)
    assert {s.spatial_size for s in plan.sites} == EXPECTED_SIZES[arch]
    assert {s.stats for s in plan.sites} == {"channel", "frequency"}
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, mode=mode, input_size=size)
    report = result.parity
    assert report.passed, report.describe()
    assert report.max_rel_err <= TOL[mode]
    assert report.top1_agreement == 1.0
    assert sorted(c.shape for c in report.cases) == [(1, *size), (3, *size)]
    assert not result.dynamic_size  # frequency-mode statistics fix the size
    # each layer on its own, channel and frequency mode (batch 3)
    layers = check_parity(path, model, per_layer=True).layers
    assert [lay.module for lay in layers] == [s.module for s in plan.sites]
    for layer in layers:  # the layer's own error; its output also carries upstream rounding
        assert layer.passed and layer.own_rel_err <= TOL[mode], layer
        assert layer.max_rel_err <= 1e-4, layer
    forms = {s.module: (s.form, s.folded_into) for s in result.sites}
    for site in plan.sites:
        form, folded = forms[site.module]
        if mode == "fold" and site.stats == "channel":
            assert form == "elementwise"
            assert folded == (site.fold_into if site.position == "after" else None)
        else:
            assert folded is None
            assert form == ("dft" if mode == "dft" else "matmul")


@pytest.mark.parametrize("arch", ["lcnet_035", "vgg11_bn"])  # resnet10t: see test_graph_...
@pytest.mark.slow
def test_channel_fold_file_serves_other_sizes(tmp_path, arch):
    """With channel-mode SBN only, a fold-mode file has a symbolic spatial size and matches
    PyTorch at a size other than the one it was exported at. VGG's classifier pools adaptively
    to 7x7, which the exporter writes for one input size only: export notices it (parity at
    another size fails) and writes a fixed-size file instead."""
    model, plan, size = converted(arch, "channel")
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, mode="fold", input_size=size)
    assert result.parity.passed
    folds = {s.module: s.folded_into for s in result.sites}
    assert all(folds[s.module] == (s.fold_into if s.position == "after" else None) for s in plan.sites)
    if arch == "vgg11_bn":
        assert not result.dynamic_size and "fixed spatial size" in result.notes[0]
        assert {c.shape[2:] for c in result.parity.cases} == {size[1:]}
        return
    assert result.dynamic_size
    assert ("other-size", (3, 3, size[1] + 32, size[2] + 32)) in [(c.source, c.shape) for c in result.parity.cases]
    sess = session(path)
    x = torch.randn(2, 3, *ARCHS[arch][3], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= TOL["fold"]
    assert (got.argmax(1) == ref.argmax(1)).all()


def _sbn_ops(path) -> dict[str, set[str]]:
    proto = onnx.load(str(path))
    ops: dict[str, set[str]] = {}
    for node in proto.graph.node:
        if node.name.startswith(NODE_PREFIX + "/"):
            site = node.name.split("/")[1]
            ops.setdefault(site, set()).add(node.op_type)
    return ops


@pytest.mark.parametrize("mode", ["fold", "matmul", "dft"])
@pytest.mark.slow
def test_graph_names_ops_and_metadata(tmp_path, mode):
    """Channel-mode resnet10t: SBN node names, op types per mode, metadata, one file; the
    caller's model untouched; fold and dft files with a symbolic size, run at a second size."""
    model, plan, size = converted("resnet10t", "channel")
    model.sbn_meta = {"model_name": "resnet10t", "recipe": "name: test\n",
                      "recipe_name": "test", "input_size": list(size)}
    model.train()
    before = copy.deepcopy(model.state_dict())
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, mode=mode)  # input size from sbn_meta
    assert result.input_size == size
    # the caller's model is untouched: weights, train flags, SBN modules
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(type(model.get_submodule(s.module)).__name__ == "SpectralBatchNorm2d" for s in plan.sites)
    # any spatial size in fold and dft modes: parity also ran at 32 more pixels each way
    assert result.dynamic_size == (mode != "matmul")
    other = [c.shape for c in result.parity.cases if c.source == "other-size"]
    assert other == ([(3, 3, size[1] + 32, size[2] + 32)] if mode != "matmul" else [])
    if result.dynamic_size:
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    ops = _sbn_ops(path)
    assert set(ops) == {s.module for s in plan.sites}
    every = set().union(*ops.values())
    if mode == "fold":  # elementwise, and the one-pixel term as a 1x1 conv of one channel
        assert not every & {"MatMul", "DFT", "Gemm"}
        proto = onnx.load(str(path))
        shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
        convs = [n for n in proto.graph.node if n.op_type == "Conv"
                 and n.name.startswith(NODE_PREFIX + "/")]
        assert len(convs) == len(plan.sites)
        for conv in convs:  # constant weights (C, 1, 1, 1): no work beyond one pass
            assert conv.input[1] in shapes and shapes[conv.input[1]][1:] == (1, 1, 1)
    elif mode == "matmul":
        assert "MatMul" in every and "DFT" not in every
    else:
        assert "DFT" in every
    meta = read_metadata(path)
    assert meta["model_name"] == "resnet10t"
    assert meta["recipe"] == "name: test\n" and meta["recipe_name"] == "test"
    assert meta["mode"] == mode
    from sbn_surgery import __version__

    assert meta["version"] == __version__
    assert [s["module"] for s in meta["sites"]] == [s.module for s in plan.sites]
    assert all(s["output"] for s in meta["sites"])
    # one self-contained file
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("mode", ["fold", "matmul", "dft"])
def test_frequency_mode_refuses_a_dynamic_size(tmp_path, mode):
    model, _, size = converted("resnet10t", "frequency")
    with pytest.raises(ExportError, match="frequency-mode statistics.*fixed size"):
        export_onnx(model, tmp_path / "m.onnx", mode=mode, input_size=size, dynamic_size=True)
    assert not (tmp_path / "m.onnx").exists()


def test_matmul_mode_refuses_a_dynamic_size(tmp_path):
    model, _, size = converted("resnet10t", "channel")
    with pytest.raises(ExportError, match="matmul mode.*one spatial size"):
        export_onnx(model, tmp_path / "m.onnx", mode="matmul", input_size=size, dynamic_size=True)


def test_frequency_mode_at_the_wrong_size_is_an_error(tmp_path):
    model, _, _ = converted("resnet10t", "frequency")
    with pytest.raises(ExportError, match="14x15.*--input-size"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 64, 64))


@pytest.mark.slow
def test_static_batch(tmp_path):
    model, _, size = converted("resnet10t", "channel")
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, mode="fold", input_size=size, dynamic_batch=False,
                         dynamic_size=False, batch_size=2)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, *size]
    assert result.parity.passed and {c.shape[0] for c in result.parity.cases} == {2}


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "fft"}, "unknown export mode"),
    ({"opset": 17}, "opset 17 is not supported"),
    ({"opset": 99}, "opset 99 is not supported"),
])
def test_bad_options(tmp_path, kwargs, match):
    model, _, size = converted("resnet10t", "channel")
    with pytest.raises(ExportError, match=match):
        export_onnx(model, tmp_path / "m.onnx", input_size=size, **kwargs)
