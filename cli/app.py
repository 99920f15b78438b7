"""The typer app. Each command lives in its own module and registers itself here."""

from __future__ import annotations

import errno
import importlib
import inspect
import sys

import typer
from rich.markup import escape
from typer.core import TyperCommand

from sbn_surgery import __version__
from sbn_surgery.errors import SbnSurgeryError

from .common import err_console
from .help import HelpCommand, HelpGroup

app = typer.Typer(
    name="sbn-surgery",
    cls=HelpGroup,
    help=(
        "Put Spectral Batch Normalization into a timm model, fine-tune it, export it to ONNX "
        "and prove parity.\n\n"
        "Start with: sbn-surgery quickstart"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _command_modules() -> list[str]:
    """Every ``cli/cmd_*.py`` module; each defines ``ORDER`` (help order) and ``register(app)``."""
    import pkgutil

    from sbn_surgery_cli import __path__ as pkg_path

    names = [m.name for m in pkgutil.iter_modules(pkg_path) if m.name.startswith("cmd_")]
    mods = [importlib.import_module(f"sbn_surgery_cli.{n}") for n in names]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sbn-surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """sbn-surgery: Spectral Batch Normalization for timm models."""


def _reflow(doc: str) -> str:
    """Docstring -> help text: paragraphs joined into one line each (the terminal wraps them);
    indented lines (examples) are kept as they are."""
    paragraphs = []
    for block in inspect.cleandoc(doc).split("\n\n"):
        lines = block.splitlines()
        if any(line.startswith("  ") for line in lines):
            paragraphs.append(block)
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


for _module in _command_modules():
    _module.register(app)
for _info in app.registered_commands:
    if _info.cls in (None, TyperCommand):
        _info.cls = HelpCommand
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = _reflow(_info.callback.__doc__)


#: OS errors that mean a path could not be written (or opened) as the user asked (no space, a
#: read-only file system, permissions): one line, like a user error, wherever they come from.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                           errno.EPERM})


def _error_line(text: str) -> None:
    # user text (paths, patterns) may hold [brackets], :emoji: codes or newlines: one plain line
    err_console.print(f"[bold red]error:[/] {escape(' '.join(text.split()))}", highlight=False,
                      soft_wrap=True, emoji=False)


def main() -> None:
    """Console entry point: user errors are one red line and exit code 2."""
    try:
        app()
    except SbnSurgeryError as exc:
        _error_line(str(exc))
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _error_line(f"{where}{exc.strerror or exc} ([Errno {exc.errno}] "
                    f"{errno.errorcode.get(exc.errno, '?')}); free space there, fix the "
                    "permissions or choose another path")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
