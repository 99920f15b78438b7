"""`sbn-surgery version`: the versions that matter for a bug report."""

from __future__ import annotations

import platform

import typer

from .common import console, print_json

ORDER = 900


def version(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show the versions of sbn-surgery, torch, timm and onnxruntime."""
    import onnxruntime
    import timm
    import torch

    from sbn_surgery import __version__

    info = {
        "sbn_surgery": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if json_out:
        print_json(info)
    else:
        for k, v in info.items():
            console.print(f"{k:>14}  {v}")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Other")(version)
