"""`sbn-surgery recipes [NAME]`: list the shipped recipes, or print one."""

from __future__ import annotations

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
    """List the shipped recipes, or print one.

    [bold]Examples[/bold]

      sbn-surgery recipes

      sbn-surgery recipes resnet
    """
    from sbn_surgery.recipe import load_recipe, shipped_recipes

    if name is not None:
        recipe = load_recipe(name)
        if json_out:
            print_json({"name": recipe.name, "source": recipe.source, "text": recipe.to_yaml_text()})
        else:
            console.print(f"[dim]# {recipe.source}[/]")
            console.print(Syntax(recipe.to_yaml_text(), "yaml", background_color="default"))
        return
    rows = [load_recipe(n) for n in shipped_recipes()]
    if json_out:
        print_json({"recipes": [{"name": r.name, "models": r.models, "rules": len(r.rules),
                                 "description": r.description.strip()} for r in rows]})
        return
    table = Table(title="Shipped recipes", show_lines=False)
    table.add_column("name", style="bold cyan")
    table.add_column("models")
    table.add_column("rules", justify="right")
    table.add_column("description")
    for r in rows:
        models = ", ".join(r.models[:4]) + (" ..." if len(r.models) > 4 else "") or "any CNN with BatchNorm"
        first = r.description.strip().split(". ")[0].rstrip(".")
        table.add_row(r.name, escape(models), str(len(r.rules)), escape(first))
    console.print(table)
    console.print("Print one with [bold]sbn-surgery recipes NAME[/]; use one with "
                  "[bold]--recipe NAME[/] or [bold]--recipe path/to/recipe.yaml[/].")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Convert")(recipes)
