"""One voice under torchrun: a rank other than 0 prints none of its user errors, notices or
warnings (they repeat rank 0's) and still exits with its code; a bug's traceback still shows.
The end-to-end tests start two processes with the environment torchrun gives them (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import free_port, one_line_error


@pytest.fixture
def rank1(monkeypatch):
    import sbn_surgery_cli.app as A

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(A, "QUIET_RANK_DELAY_S", 0.0)


def test_rank_1_is_silent_on_a_user_error_and_exits_2(rank1, run_cli):
    result = run_cli("recipes", "no-such-recipe")
    assert result.code == 2 and result.stderr == "" and result.stdout == ""


def test_rank_1_is_silent_on_a_usage_error(rank1, run_cli):
    result = run_cli("recipes", "--no-such-option")
    assert result.code == 2 and result.stderr == ""


def test_rank_1_shows_a_bug(rank1, run_cli, monkeypatch):
    import sbn_surgery.recipe as R

    def broken(*a, **k):
        raise RuntimeError("a bug, not the user's")

    monkeypatch.setattr(R, "load_recipe", broken)
    result = run_cli("recipes", "resnet")
    assert result.code == 1
    assert "Traceback" in result.stderr and "a bug, not the user's" in result.stderr


def test_rank_0_and_a_lone_process_speak(run_cli, monkeypatch):
    one_line_error(run_cli("recipes", "no-such-recipe"), "no recipe named 'no-such-recipe'")
    monkeypatch.setenv("RANK", "0")
    one_line_error(run_cli("recipes", "no-such-recipe"), "no recipe named 'no-such-recipe'")


def _two_ranks(*args: str) -> list[subprocess.CompletedProcess]:
    """``python -m sbn_surgery_cli ARGS`` as torchrun starts it on 2 CPU processes (gloo)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        procs.append(subprocess.Popen([sys.executable, "-m", "sbn_surgery_cli", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_one_error_line_both_exit_2(tmp_path):
    r0, r1 = _two_ranks("finetune", "resnet10t", "--data", str(tmp_path / "no-such-dir"),
                        "--device", "cpu", "-o", str(tmp_path / "out"))
    one_line_error(r0, "no-such-dir")
    assert r1.returncode == 2 and r1.stderr == "" and r1.stdout == ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_one_voice_for_notices_and_no_ddp_warning(tmp_path):
    r0, r1 = _two_ranks("finetune", "resnet10t", "--data", "synthetic", "--subset", "32",
                        "-b", "8", "--input-size", "3", "32", "32", "--epochs", "1", "--amp",
                        "--device", "cpu", "-o", str(tmp_path / "out"), "--json")
    assert r0.returncode == 0 and r1.returncode == 0, r0.stderr[-2000:] + r1.stderr[-2000:]
    text = " ".join(r0.stderr.split())
    assert text.count("--amp on CPU") == 1 and text.count("calibration: SBN statistics") == 1
    assert "Warning" not in r0.stderr  # torch's broadcast_buffers FutureWarning among them
    assert r1.stderr == "" and r1.stdout == ""
