"""Shared CLI plumbing: consoles, JSON output, progress bars, option parsing helpers."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from sbn_surgery.errors import SbnSurgeryError

#: Human output (tables, progress) goes to stderr when --json owns stdout.
console = Console()
err_console = Console(stderr=True)


def main_process() -> bool:
    """Whether this process speaks: always, except in a torchrun worker other than rank 0 (its
    errors, notices and warnings would repeat rank 0's, once per process)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def out(json_mode: bool) -> Console:
    """The console for human-readable output: stderr under --json, so stdout stays one object."""
    return err_console if json_mode else console


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextmanager
def progress_bar(json_mode: bool, quiet: bool = False) -> Iterator[Any]:
    """Yields a callback ``cb(task, completed, total, **fields)`` that drives a rich progress bar.

    Library code calls it as ``progress(description, done, total, info="...")``; one bar per
    description. Under --json the bar is drawn on stderr.
    """
    if quiet:
        yield None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=out(json_mode),
        transient=False,
    )
    tasks: dict[str, int] = {}

    def cb(description: str, completed: int, total: Optional[int], info: str = "") -> None:
        if not tasks:  # started on first use: a command that fails before any work draws nothing
            prog.start()
        if description not in tasks:
            tasks[description] = prog.add_task(description, total=total, info=info)
        prog.update(tasks[description], completed=completed, total=total, info=info)

    try:
        yield cb
    finally:
        if tasks:
            prog.stop()


FORCE_HELP = "Apply --recipe even if its `models` patterns do not name MODEL."


def parse_kv(pairs: Optional[list[str]], option: str) -> dict[str, Any]:
    """Parse ``k=v`` pairs (values as YAML scalars: 0.1, true, [1, 2], text)."""
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SbnSurgeryError(f"{option} expects key=value, got {pair!r}; e.g. {option} drop_rate=0.1")
        key, value = pair.split("=", 1)
        try:
            result[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            result[key.strip()] = value
    return result
