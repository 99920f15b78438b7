"""The typer app. Each command lives in its own module (``cli/cmd_*.py``) and registers itself
here; a command is made into a click command only when it runs or shows its help, and no module
imports torch or timm at its top, so ``--help``, ``recipes`` and ``version`` start at once."""

from __future__ import annotations

import errno
import importlib
import inspect
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Iterator, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand
from typer.models import CommandInfo

from sbn_surgery import __version__
from sbn_surgery.errors import SbnSurgeryError

from .common import err_console, main_process
from .help import HelpCommand, HelpGroup


class LazyCommands(MutableMapping):
    """The root group's commands: every name is listed at once, and a command becomes a click
    command (its options read, e.g. the run options that need pydantic) when first looked up.
    ``sbn-surgery --help`` lists them from :meth:`summaries` without making any."""

    def __init__(self, infos: list[CommandInfo]) -> None:
        self._infos = {info.name or info.callback.__name__.lower().replace("_", "-"): info
                       for info in infos}
        self._made: dict[str, Any] = {}

    def summaries(self) -> list[tuple[str, Optional[str], str, bool]]:
        """(name, help panel, help text, hidden) of every command, in help order."""
        return [(name, info.rich_help_panel, info.help or "", bool(info.hidden))
                for name, info in self._infos.items()]

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            info = self._infos[name]  # KeyError: no such command
            one = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False,
                              add_completion=False)
            one.registered_commands.append(info)
            self._made[name] = typer.main.get_command(one)
        return self._made[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._made[name] = command
        self._infos.setdefault(name, CommandInfo(name=name))

    def __delitem__(self, name: str) -> None:
        del self._infos[name]
        self._made.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


class RootGroup(HelpGroup):
    """The root group: its commands are made on first use (see :class:`LazyCommands`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(_COMMANDS)  # made below, before app() runs


app = typer.Typer(
    name="sbn-surgery",
    cls=RootGroup,
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


def _command_modules() -> list:
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


def _registered() -> list[CommandInfo]:
    """Every command the modules register, with help made from its docstring."""
    registry = typer.Typer()
    for module in _command_modules():
        module.register(registry)
    for info in registry.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = HelpCommand
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = _reflow(info.callback.__doc__)
    return registry.registered_commands


_COMMANDS = _registered()


#: How long a quiet rank that fails waits before it exits (see :func:`main`).
QUIET_RANK_DELAY_S = 2.0


class _Tail:
    """A stderr that keeps only its last ``limit`` characters: where a quiet rank writes."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self.text, self.limit = "", limit

    def write(self, text: str) -> int:
        self.text = (self.text + text)[-self.limit:]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


#: OS errors that mean a path could not be written (or opened) as the user asked (no space, a
#: read-only file system, permissions): one line, like a user error, wherever they come from.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                           errno.EPERM})


def _error_line(text: str) -> None:
    # user text (paths, patterns) may hold [brackets], :emoji: codes or newlines: one plain line
    err_console.print(f"[bold red]error:[/] {escape(' '.join(text.split()))}", highlight=False,
                      soft_wrap=True, emoji=False)


def main() -> None:
    """Console entry point: user errors are one red line and exit code 2. Under torchrun only
    rank 0 speaks: another rank's stderr (its user errors, notices and warnings, which repeat
    rank 0's) is dropped, and shown only when that rank fails by a bug; its exit code stays."""
    if main_process():
        _main()
        return
    held, real = _Tail(), sys.stderr
    sys.stderr = held  # type: ignore[assignment]
    code: object = 0
    try:
        _main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - a bug: its traceback is shown, as on rank 0
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stderr = real
    if code not in (None, 0, 2, 130, 143):  # a bug: not a user error, Ctrl-C or SIGTERM
        real.write(held.text)
    if code not in (None, 0):  # torchrun stops the other ranks when one exits: let rank 0,
        time.sleep(QUIET_RANK_DELAY_S)  # failing on the same input, print its line first
    sys.exit(code)


def _main() -> None:
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
