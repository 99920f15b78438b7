"""`sbn-surgery version`: the versions that matter for a bug report."""

from __future__ import annotations

import platform
from typing import Any, Optional

import typer

from .common import console, print_json

ORDER = 900


def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _torch_build() -> dict[str, Any]:
    """torch's full version (``2.14.1+cpu``) and the CUDA version its wheel was built for (None:
    a CPU wheel), read from the installed ``torch/version.py`` without importing torch (which
    takes seconds). Only literal assignments are read; the file is never run."""
    import ast
    from importlib import metadata
    from pathlib import Path

    info: dict[str, Any] = {"torch": _dist_version("torch"), "torch_cuda": None}
    try:
        path = Path(str(metadata.distribution("torch").locate_file("torch/version.py")))
        tree = ast.parse(path.read_text(encoding="utf-8")[:100_000])
    except (metadata.PackageNotFoundError, OSError, SyntaxError, ValueError):
        return info
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and \
                isinstance(value.value, (str, type(None))):
            if target.id == "__version__" and value.value:
                info["torch"] = value.value
            elif target.id == "cuda":
                info["torch_cuda"] = value.value
    return info


def version(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    cuda: bool = typer.Option(False, "--cuda", help="Also import torch and say whether it can "
                              "use a CUDA device (takes a few seconds)."),
) -> None:
    """Show the versions of sbn-surgery, Python, torch, timm and onnxruntime.

    torch_cuda is the CUDA version torch was built for (none: a CPU wheel).

    [bold]Examples[/bold]

      sbn-surgery version

      sbn-surgery version --cuda --json
    """
    from sbn_surgery import __version__

    info: dict[str, Any] = {"sbn_surgery": __version__, "python": platform.python_version(),
                            **_torch_build(), "timm": _dist_version("timm"),
                            "onnxruntime": _dist_version("onnxruntime")}
    if cuda:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
    if json_out:
        print_json(info)
    else:
        for k, v in info.items():
            console.print(f"{k:>14}  {'none' if v is None else v}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Other")(version)
