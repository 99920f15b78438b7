"""``--help`` that reads well in 80 columns and through a pipe.

typer's rich help puts every option in a six-column table (names, short names, negative names,
type, help): at 80 columns the help text is left about 18 characters. Here each option is one
entry, names and metavar on the left (``-d, --data NAME|DIR``, ``--amp / --no-amp``), the help
text on the right with its default, and a long entry puts its help on the next line. Commands
keep their panels (``rich_help_panel``) as headings.
"""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

#: The left column's widest entry; a longer one takes a line of its own.
_LEFT_MAX = 28

#: Metavars by parameter name, for options that declare none (else the name in capitals).
_METAVARS = {
    "input_size": "C H W", "model_kwargs": "KEY=VALUE", "recipe": "NAME|FILE",
    "checkpoint": "FILE|DIR", "output": "PATH", "data": "SOURCE", "calibrate_data": "SOURCE",
    "num_classes": "N", "batch_size": "N", "calibrate_batches": "N", "epochs": "N",
    "subset": "N", "workers": "N", "seed": "N", "batches": "N", "opset": "N",
    "data_images": "N", "batch": "N", "repeats": "N", "warmup": "N", "threads": "N",
    "lr": "LR", "weight_decay": "WD", "warmup_epochs": "EPOCHS", "label_smoothing": "EPS",
    "rtol": "RTOL", "min_top1": "FRACTION", "optimizer": "sgd|adamw", "train": "all|norm|sbn",
    "device": "auto|cuda|cpu", "init": "identity|standard", "mode": "fold|matmul|dft",
    "norm_stats": "batch|running", "plot": "FILE.png", "against": "FILE.onnx",
}


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def _entry(param: Any) -> str:
    """``-d, --data NAME|DIR``; options without a ``metavar`` show their name in capitals."""
    if _is_argument(param):
        return (param.metavar or param.name or "").upper()
    names = sorted(param.opts, key=lambda o: (o.startswith("--"), o))
    left = ", ".join(names)
    if param.secondary_opts:
        left += " / " + ", ".join(param.secondary_opts)
    if not getattr(param, "is_flag", False) and not getattr(param, "count", False):
        name = param.name or "value"
        left += " " + (param.metavar or _METAVARS.get(name) or name.upper())
    return left


def _default(param: Any) -> Optional[str]:
    show = getattr(param, "show_default", None)
    if isinstance(show, str):
        return show
    if show is False or getattr(param, "hidden", False):
        return None
    value = param.default
    if value is None or callable(value) or value == () or value == []:
        return None
    if getattr(param, "is_flag", False):
        if not param.secondary_opts:
            return None  # a plain flag is off unless given
        on, off = param.opts[0], param.secondary_opts[0]
        return on if value else off
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _help_of(param: Any) -> Text:
    text = Text(getattr(param, "help", None) or "")
    default = _default(param)
    if default is not None and "[default:" not in text.plain:
        text.append(f" [default: {default}]", style="dim")
    if param.required:
        text.append(" [required]", style="dim red")
    return text


def _rows(rows: list[tuple[str, Any]], width: int) -> Group:
    """Two columns; an entry wider than the left column stands on its own line, its help below."""
    left_w = min(max((len(left) for left, _ in rows), default=0), _LEFT_MAX)
    parts: list[Any] = []
    table: Optional[Table] = None
    for left, right in rows:
        if len(left) > left_w:
            parts.append(Text(left, style="bold cyan"))
            left, table = "", None
        if table is None:
            table = Table.grid(padding=(0, 2), pad_edge=False)
            table.add_column(width=left_w, no_wrap=True, style="bold cyan")
            table.add_column(width=max(width - left_w - 2, 20))
            parts.append(table)
        table.add_row(left, right)
    return Group(*parts)


def _print_text(console: Console, help_text: str) -> None:
    """Paragraphs wrap, one space in; indented lines (examples) are kept as they are."""
    for block in help_text.split("\n\n"):
        console.print(Padding(Text.from_markup(block, emoji=False), (0, 0, 0, 1)))
        console.print()


def _panels(params: list[Any], ctx: Any) -> dict[str, list[tuple[str, Any]]]:
    panels: dict[str, list[tuple[str, Any]]] = {}
    for p in params:
        if getattr(p, "hidden", False):
            continue
        default_panel = "Arguments" if _is_argument(p) else "Options"
        panel = getattr(p, "rich_help_panel", None) or default_panel
        panels.setdefault(panel, []).append((_entry(p), _help_of(p)))
    return panels


def _commands(group: Any, ctx: Any) -> list[tuple[str, Optional[str], str]]:
    """(name, panel, help) of the group's visible commands; from the summaries of lazily made
    commands where the group has them, so listing them makes none."""
    summaries = getattr(group.commands, "summaries", None)
    if summaries is not None:
        return [(name, panel, text) for name, panel, text, hidden in summaries() if not hidden]
    rows = []
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            rows.append((name, getattr(sub, "rich_help_panel", None), sub.help or ""))
    return rows


def _usage(cmd: Any, ctx: Any) -> str:
    pieces = ["[OPTIONS]"]
    for p in cmd.get_params(ctx):
        if _is_argument(p):
            name = _entry(p)
            pieces.append(name if p.required else f"[{name}]")
    if hasattr(cmd, "list_commands"):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def render_help(cmd: Any, ctx: Any) -> None:
    console = Console(highlight=False, soft_wrap=False)
    width = console.width
    console.print(Text(f" Usage: {ctx.command_path} {_usage(cmd, ctx)}", style="bold"))
    console.print()
    if cmd.help:
        _print_text(console, cmd.help)
    sections = _panels(cmd.get_params(ctx), ctx)
    if hasattr(cmd, "list_commands"):  # the root group (typer's is no click.Group)
        for name, panel, text in _commands(cmd, ctx):
            first = text.split("\n\n")[0]
            sections.setdefault(panel or "Commands", []).append(
                (name, Text.from_markup(first, emoji=False)))
    for title, rows in sections.items():
        console.print(Text(f" {title}", style="bold"))
        console.print(Padding(_rows(rows, width - 2), (0, 0, 0, 2)))
        console.print()


class HelpCommand(TyperCommand):
    """A typer command whose ``--help`` is :func:`render_help`."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        render_help(self, ctx)


class HelpGroup(TyperGroup):
    """The root group, with the same ``--help``."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        render_help(self, ctx)
