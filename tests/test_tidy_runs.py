"""Tidy runs: a finished run drops state.pt unless --keep-state (it stays while the run can go
on: interrupted, or kept to be extended); a directory that holds a finished run is not taken
over without --overwrite; curves.png shows the EMA model with --model-ema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import one_line_error
from sbn_surgery.errors import CheckpointError
from sbn_surgery.train import finetune

TINY = dict(subset=48, batch_size=16, input_size=(3, 32, 32))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("done") / "run"
    return finetune("resnet10t", "synthetic", output=out, epochs=1, **TINY)


def test_a_finished_run_drops_its_state(finished):
    out = finished.output
    names = {p.name for p in Path(out).iterdir()}
    assert "state.pt" not in names
    assert {"best.safetensors", "last.safetensors", "metrics.jsonl", "args.yaml",
            "summary.csv", "curves.png"} <= names


def test_resuming_a_finished_run_without_state_says_what_to_do(finished, tmp_path):
    with pytest.raises(CheckpointError, match="finished and kept no state.pt.*--keep-state"):
        finetune("resnet10t", "synthetic", output=finished.output, resume=True, epochs=2)


def test_a_finished_run_is_not_overwritten_without_overwrite(finished):
    """Without state.pt the directory still holds a run: a new run there is refused."""
    best = Path(finished.output) / "best.safetensors"
    mtime = os.stat(best).st_mtime_ns
    with pytest.raises(CheckpointError, match="already holds a run; it finished"):
        finetune("resnet10t", "synthetic", output=finished.output, epochs=1, **TINY)
    assert os.stat(best).st_mtime_ns == mtime


def test_keep_state_keeps_it_and_the_run_extends(tmp_path, run_cli):
    out = tmp_path / "run"
    args = ["finetune", "resnet10t", "-d", "synthetic", "--subset", "48", "-b", "16",
            "--input-size", "3", "32", "32", "-o", out]
    first = run_cli(*args, "--epochs", "1", "--keep-state")
    assert first.code == 0, first.stderr
    assert (out / "state.pt").is_file()
    assert "state.pt (--resume with a larger --epochs extends the run)" in " ".join(
        first.stdout.split())
    more = run_cli(*args, "--resume", "--epochs", "2", "--json")
    assert more.code == 0, more.stderr
    assert json.loads(more.stdout)["epochs"] == 2
    assert not (out / "state.pt").exists()  # the extension finished without --keep-state
    again = run_cli(*args, "--resume", "--epochs", "3")
    one_line_error(again, "finished and kept no state.pt", "--keep-state")


def test_overwrite_leaves_no_state_that_would_resume_the_run_before(tmp_path, monkeypatch):
    """A run started with --overwrite over one kept with --keep-state, and stopped in its first
    epoch (killed, or failing): --resume must not go on with the run before (its state.pt stayed
    beside the new run's args.yaml and empty metrics)."""
    import sbn_surgery.train.loop as L

    out = tmp_path / "run"
    finetune("resnet10t", "synthetic", output=out, epochs=1, keep_state=True, **TINY)
    assert (out / "state.pt").is_file()

    def killed(self, stop):
        raise RuntimeError("the process died in epoch 1")

    monkeypatch.setattr(L._Run, "_train_epoch", killed)
    with pytest.raises(RuntimeError, match="died"):
        finetune("resnet10t", "synthetic", output=out, epochs=3, overwrite=True, **TINY)
    monkeypatch.undo()
    assert not (out / "state.pt").exists()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        finetune("resnet10t", "synthetic", output=out, resume=True)


def test_curves_show_the_ema_model():
    from sbn_surgery.train.outputs import curves_figure

    rows = [{"epoch": e, "loss": 2.0 / e, "val_loss": 2.1 / e, "top1": 0.1 * e, "top5": 0.5,
             "ema_val_loss": 2.2 / e, "ema_top1": 0.05 * e} for e in (1, 2, 3)]
    fig = curves_figure(rows)
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["EMA val top-1"].get_ydata()) == pytest.approx([5, 10, 15])
    assert list(lines["EMA val loss"].get_ydata()) == pytest.approx([2.2, 1.1, 2.2 / 3])
    plain = curves_figure([{k: v for k, v in r.items() if not k.startswith("ema")} for r in rows])
    assert not any("EMA" in ln.get_label() for ax in plain.axes for ln in ax.get_lines())
