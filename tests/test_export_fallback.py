"""A symbolic spatial size that export picked (not one asked for) gives way to a fixed size when
torch.onnx cannot write the graph with it (BEiT's relative-position table indexed by the grid
is one such model): the file is written for the export size, parity passes, a note says why.
Asked for explicitly, the failure is the user's error, as before. Before that, timm's fused
attention is computed explicitly when torch cannot decompose it."""

from __future__ import annotations

import pytest
from conftest import converted

from sbn_surgery import export_onnx
from sbn_surgery.errors import ExportError
from sbn_surgery.export import exporter


@pytest.fixture
def no_symbolic_size(monkeypatch):
    """The exporter fails whenever the spatial axes are symbolic; records each call's axes."""
    real, calls = exporter._torch_export, []

    def fake(work, example, opset, dynamic_shapes):
        axes = set(dynamic_shapes[0]) if dynamic_shapes else set()
        calls.append(axes)
        if {2, 3} & axes:
            raise ExportError("torch.onnx.export (dynamo) failed for this model at opset 20: "
                              "ConversionError: no symbolic grid. Try a fixed size (--fixed-size)")
        return real(work, example, opset, dynamic_shapes)

    monkeypatch.setattr(exporter, "_torch_export", fake)
    return calls


def test_a_picked_symbolic_size_falls_back_to_the_export_size(tmp_path, no_symbolic_size):
    model, _, size = converted("resnet10t", "channel")
    result = export_onnx(model, tmp_path / "m.onnx", mode="fold", input_size=size)
    assert no_symbolic_size == [{0, 2, 3}, {0}]  # tried symbolic, then fixed (batch stays free)
    assert not result.dynamic_size and result.dynamic_batch
    assert result.parity.passed
    assert {c.shape[1:] for c in result.parity.cases} == {size}
    assert len(result.notes) == 1 and "no symbolic grid" in result.notes[0]
    assert f"{size[1]}x{size[2]} inputs only" in result.notes[0]
    assert (tmp_path / "m.onnx").is_file()


def test_an_asked_for_symbolic_size_is_not_replaced(tmp_path, no_symbolic_size):
    model, _, size = converted("resnet10t", "channel")
    with pytest.raises(ExportError, match="no symbolic grid"):
        export_onnx(model, tmp_path / "m.onnx", mode="fold", input_size=size, dynamic_size=True)
    assert no_symbolic_size == [{0, 2, 3}]
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_beit_exports_with_its_attention_computed_explicitly(tmp_path):
    """torch.onnx cannot decompose BEiT's fused attention with its relative-position bias (a
    view of a transposed tensor); the export copy computes attention explicitly instead, at any
    size, and the caller's model keeps its fused attention. A small BEiT keeps it fast."""
    import sbn_surgery as sbn

    kwargs = {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}
    model, plan = sbn.convert("beit_base_patch16_224", "vit", num_classes=10, model_kwargs=kwargs,
                              input_size=(3, 32, 32), calibrate_batches=2, calibrate_batch_size=2)
    assert [s.target for s in plan.sites] == ["blocks.1.mlp.fc2"]
    assert [s.layout for s in plan.sites] == ["tokens"]
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None]
    assert fused and all(m.fused_attn for m in fused)
    result = export_onnx(model, tmp_path / "beit.onnx", mode="fold")
    assert result.parity.passed and result.dynamic_size and not result.notes
    assert [s.folded_into for s in result.sites] == ["blocks.1.mlp.fc2"]
    assert all(m.fused_attn for m in fused)  # the caller's model is not changed
