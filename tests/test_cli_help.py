"""Every command documents itself: examples in --help, help text on every option."""

from __future__ import annotations

import click
import pytest
import typer

from sbn_surgery_cli.app import app

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)


def test_the_main_commands_are_there():
    assert {"recipes", "inspect", "convert", "finetune", "export", "parity", "bench", "diagnose",
            "quickstart"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_examples_and_every_option_is_explained(name, run_cli):
    command = GROUP.commands[name]
    undocumented = [p.name for p in command.params
                    if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undocumented, f"{name}: options without help: {undocumented}"
    result = run_cli(name, "--help")
    assert result.code == 0
    if name != "version":
        assert "Examples" in result.stdout and f"sbn-surgery {name}" in result.stdout
