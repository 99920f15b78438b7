"""`sbn-surgery recipes [NAME]`: list the shipped recipes, or print one."""

from __future__ import annotations

import re
import sys
from typing import Optional

import typer
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from .common import console, print_json

ORDER = 10


def recipes(
    name: Optional[str] = typer.Argument(None, help="A shipped recipe name or a path: print it."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List the shipped recipes, or print one (into a file or pipe: the file as it is).

    [bold]Examples[/bold]

      sbn-surgery recipes

      sbn-surgery recipes resnet
    """
    from sbn_surgery.recipe import load_recipe, shipped_recipes

    if name is not None:
        recipe = load_recipe(name)
        text = recipe.to_yaml_text()
        if json_out:
            print_json({"name": recipe.name, "source": recipe.source, "text": text})
        elif console.is_terminal:  # highlighted, long lines folded by the terminal, not cut
            console.print(f"[dim]# {recipe.source}[/]")
            console.print(Syntax(text, "yaml", background_color="default"), soft_wrap=True)
        else:  # into a file or a pipe: the recipe file itself, byte for byte
            sys.stdout.write(text)
            sys.stdout.flush()
        return
    rows = [load_recipe(n) for n in shipped_recipes()]
    if json_out:
        print_json({"recipes": [{"name": r.name, "models": r.models, "rules": len(r.rules),
                                 "description": r.description.strip()} for r in rows]})
        return
    table = Table(title="Shipped recipes", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("rules", justify="right")
    table.add_column("what it covers (models: `recipes NAME`)", overflow="fold")
    for r in rows:
        first = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(r.description.split()), maxsplit=1)[0]
        table.add_row(r.name, str(len(r.rules)), escape(first.rstrip(".")))
    console.print(table)
    console.print("Print one with [bold]sbn-surgery recipes NAME[/]; use one with "
                  "[bold]--recipe NAME[/] or [bold]--recipe path/to/recipe.yaml[/].")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Convert")(recipes)
