"""Terminal output a user pipes, redirects or reads at 80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.slow
def test_recipe_printed_into_a_pipe_is_the_file_byte_for_byte(tmp_path):
    """`sbn-surgery recipes resnet > my.yaml` at 80 columns: the file back, and it loads."""
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "sbn_surgery_cli", "recipes", "resnet"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == (ROOT / "recipes" / "resnet.yaml").read_bytes()
    assert max(map(len, proc.stdout.splitlines())) > 80  # the case that used to be cut


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_round_trips_and_loads(name, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli("recipes", name)
    assert result.code == 0
    assert result.stdout == (ROOT / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
    mine = tmp_path / "my.yaml"
    mine.write_text(result.stdout, encoding="utf-8")
    from sbn_surgery.recipe import load_recipe

    assert load_recipe(mine).model_dump() == load_recipe(name).model_dump()


def test_recipes_table_shows_each_first_sentence_whole(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli("recipes")
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "Deep Layer Aggregation (dla34 ... dla169, the X and Res2Net variants)" in text
    assert "DenseNet-121/161/169/201/264d and DenseNet-Blur" in text
    assert "…" not in result.stdout


def test_diagnose_json_prints_no_table_anywhere(run_cli):
    result = run_cli("diagnose", "resnet10t", "--input-size", "3", "32", "32", "--batch-size",
                     "4", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "resnet10t" and report["layers"]
    for table_char in ("┏", "┃", "│", "└"):  # box drawing of a table (the progress bar is ━)
        assert table_char not in result.stderr, result.stderr


def test_loader_workers_never_exceed_the_usable_cpus():
    from sbn_surgery.data import open_source
    from sbn_surgery.data.loaders import Loader, usable_cpus

    ds = open_source("synthetic")
    cfg = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3,
           "std": (0.5,) * 3}
    loader = Loader(ds, ds.train, cfg, 4, train=True, workers=usable_cpus() + 3)
    assert loader.workers == usable_cpus()
    assert Loader(ds, ds.train, cfg, 4, train=True, workers=0).workers == 0
