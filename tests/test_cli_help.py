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
    assert "Examples" in result.stdout and f"sbn-surgery {name}" in result.stdout


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_fits_80_columns_with_clear_metavars(name, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli(*([name] if name else []), "--help")
    assert result.code == 0
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    # typer's own help showed <bool> for every flag and <int,int,int> for --input-size
    assert "<bool>" not in result.stdout and "<int" not in result.stdout
    if "--input-size" in result.stdout:
        assert "--input-size C H W" in result.stdout
    # every option keeps a useful width for its help text (typer's table left ~18 characters)
    for line in lines:
        if line.startswith("  -"):
            left, _, right = line.strip().partition("  ")
            assert not right or len(line) - len(right.strip()) <= 32, line


def test_finetune_help_shows_the_library_defaults(run_cli, monkeypatch):
    from sbn_surgery.train.options import DEFAULTS, LR_PER_256

    monkeypatch.setenv("COLUMNS", "80")
    text = " ".join(run_cli("finetune", "--help").stdout.split())
    for option, key in [("--epochs N", "epochs"), ("--batch-size N", "batch_size"),
                        ("--optimizer NAME", "opt"), ("--seed N", "seed"),
                        ("--label-smoothing, --smoothing EPS", "smoothing"),
                        ("--sched cosine|step|multistep|plateau|poly|tanh", "sched")]:
        start = text.index(option)
        entry = text[start:text.index(" --", start + len(option))]
        assert f"[default: {DEFAULTS[key]}]" in entry, (option, entry)
    warmup = text[text.index("--warmup-epochs"):]
    assert f"[default: {DEFAULTS['warmup_epochs']:g}]" in warmup[:200]
    lr = text[text.index("--lr LR"):]
    assert f"{LR_PER_256['sgd']} for SGD-like" in lr[:300]
