"""Instant help: the package and the commands that only show or list things import neither torch
nor timm (the seconds a command took to start). Each command runs in a subprocess where importing
torch, torchvision or timm raises ImportError; how fast it starts is measured by
``benchmarks/startup.py``, never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BLOCKED = ("torch", "torchvision", "timm")

#: Runs ``python -m sbn_surgery_cli ARGS...`` (the CLI's entry point, as torchrun launches it)
#: with every import of a BLOCKED package failing.
BLOCKER = f"""
import runpy, sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked by the test: {{name}}")
        return None

sys.meta_path.insert(0, _Blocked())
sys.argv = ["sbn-surgery", *sys.argv[1:]]
runpy.run_module("sbn_surgery_cli", run_name="__main__", alter_sys=True)
"""


def _run(*args: str, code: str = BLOCKER) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _command_names() -> list[str]:
    from sbn_surgery_cli.app import app

    import typer

    return list(typer.main.get_command(app).commands)  # names only: no command is made


def test_the_blocker_blocks_a_command_that_needs_torch():
    result = _run("inspect", "resnet18")
    assert result.returncode != 0
    assert "blocked by the test: torch" in result.stderr or \
        "blocked by the test: timm" in result.stderr, result.stderr[-2000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args", [
    ("--help",), ("-h",), ("--version",), *[(name, "--help") for name in _command_names()],
    ("recipes",), ("recipes", "resnet"), ("version",),
], ids=lambda a: " ".join(a))
def test_runs_without_torch_or_timm(args):
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if args[-1] in ("--help", "-h"):
        assert "Usage: " in result.stdout and "Options" in result.stdout
    if args == ("recipes", "resnet"):
        assert "rules:" in result.stdout


def test_recipes_and_version_as_json_without_torch_or_timm():
    listed = json.loads(_run("recipes", "--json").stdout)
    assert "resnet" in {r["name"] for r in listed["recipes"]}
    from importlib import metadata

    info = json.loads(_run("version", "--json").stdout)
    assert info["timm"] == metadata.version("timm")
    assert info["torch"].split("+")[0] == metadata.version("torch")
    assert "cuda_available" not in info  # that one needs torch: --cuda


def test_version_reads_torch_version_py_without_running_it():
    import torch

    info = json.loads(_run("version", "--json").stdout)
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    with_cuda = json.loads(_run("version", "--json", "--cuda",
                                code="import runpy, sys; sys.argv = ['sbn-surgery', "
                                     "*sys.argv[1:]]; runpy.run_module('sbn_surgery_cli', "
                                     "run_name='__main__')").stdout)
    assert with_cuda["cuda_available"] == torch.cuda.is_available()


@pytest.mark.parametrize("statement", [
    "import sbn_surgery",
    "import sbn_surgery.train.options",
    "from sbn_surgery import SbnSurgeryError, Recipe, load_recipe, __version__",
    "import sbn_surgery_cli.app",
])
def test_importing_the_package_imports_no_torch(statement):
    probe = (f"import sys; {statement}; "
             f"print([m for m in {BLOCKED!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_public_names_still_import_as_before():
    probe = ("import os, sys; import sbn_surgery; from sbn_surgery import SpectralBatchNorm2d, "
             "convert, export_onnx; import sbn_surgery.diagnose as d; "
             "assert sbn_surgery.diagnose is d and callable(sbn_surgery.diagnose); "
             "assert callable(convert) and sbn_surgery.convert is convert; "
             "assert SpectralBatchNorm2d.__module__.startswith('sbn_surgery.layers'); "
             "assert sorted(dir(sbn_surgery)) == sorted(set(dir(sbn_surgery))) and "
             "set(sbn_surgery.__all__) <= set(dir(sbn_surgery)); "
             "from sbn_surgery import *; print(os.environ['OMP_WAIT_POLICY'], 'torch' in "
             "sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # the wait policy was set by the package, before the first public name imported torch
    assert result.stdout.split() == ["PASSIVE", "True"]


def test_an_unknown_name_is_an_attribute_error():
    import sbn_surgery

    with pytest.raises(AttributeError, match="no_such_name"):
        sbn_surgery.no_such_name  # noqa: B018
