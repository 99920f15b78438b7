"""quickstart: convert, fine-tune on digits, export fold-mode ONNX, parity; and its CLI table."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from sbn_surgery.quickstart import quickstart

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield quickstart(tmp_path_factory.mktemp("qs"), epochs=2, subset=480)
    finally:
        torch.set_num_threads(n)


def test_quickstart_produces_a_trained_exported_model(result):
    import onnxruntime as ort

    from sbn_surgery.checkpoint import load_converted
    from sbn_surgery.data import calibration_batches, data_config_for

    assert result.model == "resnet10t" and result.recipe == "resnet" and result.sbn_layers >= 2
    # SBN normalizes a spectrum worth the name: no layer sees a 2x2 or 1x1 map
    assert len(result.sbn_map_sizes) == result.sbn_layers
    assert all(h >= 4 and w >= 4 for h, w in result.sbn_map_sizes), result.sbn_map_sizes
    assert result.epochs == 2 and result.parity_passed
    assert result.val_top1 > 0.2  # digits after 2 short epochs: above chance (0.1)
    # the ONNX file computes what the best checkpoint computes, on real digits
    best = load_converted(result.checkpoint).eval()
    x = calibration_batches("digits", data_config_for(best, (3, 32, 32)), 8, 1)[0]
    sess = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = best(x).numpy()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    lines = open(f"{result.output}/metrics.jsonl").read().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["top1"] == pytest.approx(result.val_top1)


def test_quickstart_cli_prints_one_table_or_json(result, monkeypatch, capsys):
    import sbn_surgery.quickstart as qs
    from sbn_surgery_cli import app

    monkeypatch.setattr(qs, "quickstart", lambda output, progress=None: result)
    for extra in ([], ["--json"]):
        monkeypatch.setattr(sys, "argv", ["sbn-surgery", "quickstart", *extra])
        with pytest.raises(SystemExit) as exc:
            app.main()
        assert exc.value.code in (0, None)
        out = capsys.readouterr().out
        if extra:
            data = json.loads(out)
            assert data["parity_passed"] is True and data["onnx"] == result.onnx
        else:
            assert "quickstart: resnet10t + SBN" in out and "passed" in out
            assert f"{100 * result.val_top1:.1f} %" in out
