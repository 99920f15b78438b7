"""Shared fixtures."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

#: Printed at the start of every run (also under -q), so a CI log shows what the install resolved.
_REPORTED = ("pytest", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript",
             "numpy", "pydantic", "typer", "rich", "safetensors", "scikit-learn")


def pytest_sessionstart(session):
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    line = ", ".join(f"{n} {version(n)}" for n in _REPORTED)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"python {sys.version.split()[0]}: {line}")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``sbn-surgery ARGS...`` in-process through the real entry point (error handling
    included); returns exit code, stdout and stderr."""
    from sbn_surgery_cli.app import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["sbn-surgery", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
