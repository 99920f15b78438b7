"""Parity checks (including per-layer), tolerances, latency, and the export/parity/bench CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import converted, one_line_error

from sbn_surgery import convert, export_onnx, save_converted
from sbn_surgery.errors import ParityError
from sbn_surgery.export import read_metadata
from sbn_surgery.parity import ParityFailed, bench, check_parity, default_rtol
from sbn_surgery.recipe import Recipe


SIZE = (3, 56, 60)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """resnet10t with two SBN layers (14x15 after layer1.0.bn2, 7x8 replacing layer2.0.bn2),
    exported in fold mode without the automatic check."""
    model, plan, size = converted("resnet10t", "channel")
    path = tmp_path_factory.mktemp("parity") / "r10.onnx"
    export_onnx(model, path, mode="fold", input_size=size, parity=False)
    return model, plan, path


def test_per_layer_parity_of_a_good_file(exported):
    model, plan, path = exported
    report = check_parity(path, model, per_layer=True)
    assert report.passed and report.first_bad_layer is None
    assert [layer.module for layer in report.layers] == [s.module for s in plan.sites]
    for layer in report.layers:
        assert layer.passed and layer.own_rel_err <= 1e-5 and layer.max_rel_err <= 1e-5, layer
        assert layer.input_rel_err <= 1e-5, layer


@pytest.mark.slow
def test_per_layer_parity_of_layers_with_a_zero_scale(tmp_path):
    # A fresh standard init carries timm's zero-init into the SBN (gamma 0), and fold mode folds
    # that 0 into the BatchNorm in front: the file cannot show the layer's input, only its output.
    model, plan = convert("resnet10t", "resnet", num_classes=10, input_size=(3, 64, 64))
    layer = model.get_submodule(plan.sites[0].module)
    with torch.no_grad():
        layer.weight[: layer.num_features // 2] = 1.0  # half the channels zero, half not
    export_onnx(model, tmp_path / "z.onnx", mode="fold", input_size=(3, 64, 64), parity=False)
    report = check_parity(tmp_path / "z.onnx", model, per_layer=True)
    assert report.passed and report.first_bad_layer is None
    for row in report.layers:
        assert row.passed and row.own_rel_err <= 1e-5 and row.input_rel_err <= 1e-5, row
    json.dumps(report.to_json(), allow_nan=False)


def test_per_layer_parity_finds_where_the_error_starts(exported):
    model, plan, path = exported
    wrong = copy.deepcopy(model)
    second = plan.sites[1].module
    with torch.no_grad():  # the file's second SBN no longer matches this model
        wrong.get_submodule(second).running_var.mul_(1.5)
    report = check_parity(path, wrong, per_layer=True)
    assert not report.passed
    first, last = report.layers
    assert first.passed and first.own_rel_err <= 1e-5
    assert not last.passed and last.own_rel_err > 1e-2 and last.input_rel_err <= 1e-5
    assert report.first_bad_layer == second
    with pytest.raises(ParityFailed, match=second):
        raise ParityFailed(report, path)


def test_parity_with_real_images_and_restored_flags(exported):
    model, _, path = exported
    model.train()
    images = torch.rand(7, *SIZE) * 2 - 1
    report = check_parity(path, model, images=images)
    assert report.passed
    shapes = [(c.source, c.shape[0]) for c in report.cases]
    assert shapes == [("random", 1), ("random", 3), ("images", 1), ("images", 3), ("images", 3),
                      ("other-size", 3)]  # a symbolic-size file is also run at 88x92
    assert all(m.training for m in model.modules())
    model.eval()
    with pytest.raises(ParityError, match="Resize them"):
        check_parity(path, model, images=torch.rand(2, 3, 32, 32))


@pytest.mark.slow
def test_export_keeps_a_failing_file_and_raises(tmp_path):
    model, _, size = converted("resnet10t", "channel")
    path = tmp_path / "m.onnx"
    with pytest.raises(ParityFailed) as info:
        export_onnx(model, path, mode="dft", input_size=size, rtol=1e-12)
    assert isinstance(info.value, ParityError)
    failed = tmp_path / "m.parity-failed.onnx"
    assert not path.exists() and info.value.path == failed and info.value.target == path
    assert info.value.report.max_rel_err > 1e-12
    assert read_metadata(failed)["mode"] == "dft"
    assert [p.name for p in tmp_path.iterdir()] == [failed.name]  # no staging left behind


def test_parity_images_of_the_wrong_size_are_refused_before_the_file_is_replaced(tmp_path):
    from sbn_surgery.errors import ExportError

    model, plan, size = converted("resnet10t", "channel")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"a file the user keeps")
    with pytest.raises(ExportError, match="parity images have shape"):
        export_onnx(model, path, mode="fold", input_size=size,
                    images=iter([torch.zeros(2, 3, 32, 32)]))
    assert path.read_bytes() == b"a file the user keeps"


def test_default_tolerances_grow_with_transform_length():
    small = [{"spatial_size": [7, 7], "form": "elementwise"}]
    big = [{"spatial_size": [56, 56], "form": "matmul"}]
    assert default_rtol("fold", small) == 1e-5
    assert default_rtol("matmul", small) == 1e-5
    assert default_rtol("matmul", big) == pytest.approx(1e-5 * math.sqrt(56 * 56 / 256))
    assert default_rtol("fold", big) == default_rtol("matmul", big)  # frequency mode in fold
    assert default_rtol("dft", small) == 1e-4
    assert default_rtol("dft", [{"spatial_size": [112, 112]}]) == pytest.approx(1e-4 * math.log2(112 * 112) / 12)
    # in fold mode a large elementwise layer has no transform: only the matmul one counts
    mixed = [{"spatial_size": [56, 56], "form": "elementwise"},
             {"spatial_size": [7, 7], "form": "matmul"}]
    assert default_rtol("fold", mixed) == 1e-5
    assert default_rtol("matmul", mixed) == default_rtol("matmul", big)


def test_bench_reports_medians_and_ratio(exported):
    _, _, path = exported
    report = bench(path, path, batch=2, repeats=3, warmup=1)
    assert report.latency_ms > 0 and report.against_latency_ms > 0
    assert report.ratio == pytest.approx(report.latency_ms / report.against_latency_ms)
    assert report.input_shape == (2, *SIZE)
    data = report.to_json()
    assert set(data) >= {"onnx", "against", "latency_ms", "against_latency_ms", "ratio", "batch"}
    cpu = bench(path, batch=1, repeats=2, warmup=0, threads=1, clock="cpu")
    assert cpu.clock == "cpu" and cpu.latency_ms > 0 and cpu.ratio is None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # after the first norm of each block: timm zero-initializes the last one (bn2)
    recipe = Recipe(name="r10-test", rules=[{"paths": ["layer1.0.bn1"]},
                                            {"paths": ["layer2.0.bn1"], "sbn": {"stats": "frequency"}}])
    model, _ = convert("resnet10t", recipe, num_classes=10, input_size=SIZE, calibrate_batches=2,
                       calibration=[torch.randn(4, *SIZE) for _ in range(2)])
    path = tmp_path_factory.mktemp("ckpt") / "r10.safetensors"
    save_converted(model, path)
    return path


@pytest.mark.slow
def test_cli_export_parity_bench_json(run_cli, checkpoint, tmp_path):
    onnx_path = tmp_path / "r10.onnx"
    res = run_cli("export", checkpoint, "-o", onnx_path, "--mode", "matmul", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert {"onnx", "mode", "opset", "parity"} <= set(data)
    assert data["onnx"] == str(onnx_path) and data["mode"] == "matmul" and data["opset"] == 20
    assert set(data["parity"]) == {"max_abs_err", "max_rel_err", "top1_agreement", "passed"}
    assert data["parity"]["passed"] and data["parity"]["top1_agreement"] == 1.0
    meta = read_metadata(onnx_path)
    assert meta["model_name"] == "resnet10t" and meta["recipe_name"] == "r10-test"
    assert "layer2.0.bn1" in meta["recipe"]

    res = run_cli("parity", onnx_path, checkpoint, "--per-layer", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["passed"] and data["first_bad_layer"] is None
    assert [layer["module"] for layer in data["layers"]] == ["layer1.0.bn1.sbn", "layer2.0.bn1.sbn"]

    res = run_cli("bench", onnx_path, "--against", onnx_path, "--batch", "2", "--repeats", "2",
                  "--threads", "1", "--cpu-time", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["batch"] == 2 and data["ratio"] > 0 and data["clock"] == "cpu"


@pytest.mark.slow
def test_cli_human_output_and_real_images(run_cli, checkpoint, tmp_path):
    onnx_path = tmp_path / "r10.onnx"
    res = run_cli("export", checkpoint, "-o", onnx_path, "--data", "synthetic", "--data-images", "4")
    assert res.code == 0, res.stderr
    assert "PASSED" in res.stdout and "images" in res.stdout
    res = run_cli("parity", onnx_path, checkpoint, "--per-layer")
    assert res.code == 0, res.stderr
    assert "layer2.0.bn1.sbn" in res.stdout and "PASSED" in res.stdout
    row = next(line for line in res.stdout.splitlines() if "layer2.0.bn1.sbn" in line)
    assert row.rstrip(" │").endswith("ok")  # each layer's verdict fits in 80 columns


@pytest.mark.slow
def test_cli_errors_are_one_line_and_exit_2(run_cli, checkpoint, tmp_path):
    onnx_path = tmp_path / "r10.onnx"
    res = run_cli("export", checkpoint, "-o", onnx_path, "--dynamic-size")
    assert res.code == 2
    assert "frequency-mode statistics" in res.stderr and "Traceback" not in res.stderr
    assert not onnx_path.exists()

    res = run_cli("export", checkpoint, "-o", onnx_path, "--mode", "dft", "--rtol", "1e-12")
    assert res.code == 2 and "parity failed" in res.stderr and "Traceback" not in res.stderr
    failed = tmp_path / "r10.parity-failed.onnx"
    assert not onnx_path.exists() and failed.is_file()  # kept beside it for inspection
    assert str(failed) in res.stderr
    assert "FAILED" in res.stdout and "max rel err" in res.stdout  # with the table that says why
    res = run_cli("export", checkpoint, "-o", onnx_path, "--mode", "dft", "--rtol", "1e-12",
                  "--json")
    report = json.loads(res.stdout)
    assert res.code == 2 and report["mode"] == "dft" and report["parity"]["passed"] is False
    assert report["parity"]["max_rel_err"] > 1e-12
    onnx_path = failed
    res = run_cli("parity", onnx_path, checkpoint, "--rtol", "1e-12", "--json")
    assert res.code == 2 and json.loads(res.stdout)["passed"] is False
    res = run_cli("parity", onnx_path, checkpoint, "--input-size", "3", "64", "64")  # freq. SBN
    one_line_error(res, "takes input N x 3x56x60, not 3x64x64")
    res = run_cli("bench", onnx_path, "--input-size", "3", "64", "64")
    one_line_error(res, "takes input N x 3x56x60, not 3x64x64")
    one_line_error(run_cli("parity", tmp_path / "missing.onnx", checkpoint), "not found")
    one_line_error(run_cli("export", checkpoint, "-o", tmp_path), "is a directory")
    res = run_cli("export", checkpoint, "-o", tmp_path / "c1.onnx", "--input-size", "1", "56", "60")
    one_line_error(res, "does not run at input size 1x56x60")
