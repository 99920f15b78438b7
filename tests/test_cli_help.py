"""Every command documents itself: examples in --help, help text on every option."""

from __future__ import annotations

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
    options = [p for p in command.params if getattr(p, "param_type_name", "") == "option"]
    assert options  # typer's own parameter classes are no click.Option: see that they count
    undocumented = [p.name for p in options if not (p.help or "").strip()]
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
    text = " ".join(run_cli("finetune", "--help-all").stdout.split())
    for option, key in [("--epochs N", "epochs"), ("--batch-size N", "batch_size"),
                        ("--optimizer NAME", "opt"), ("--seed N", "seed"),
                        ("--label-smoothing, --smoothing EPS", "smoothing"),
                        ("--sched cosine|step|multistep|plateau|poly|tanh", "sched")]:
        start = text.index(option)
        entry = text[start:text.index(" --", start + len(option))]
        assert f"[default: {DEFAULTS[key]}]" in entry, (option, entry)
    warmup = text[text.index("--warmup-epochs"):]
    assert "Default: 1, or a tenth of --epochs when that is less" in warmup[:200]
    lr = text[text.index("--lr LR"):]
    assert f"{LR_PER_256['sgd']} for SGD-like" in lr[:300]


def _examples(name: str) -> list[str]:
    """The example lines of a command's help (its blocks of indented lines)."""
    blocks = (GROUP.commands[name].help or "").split("\n\n")
    return [line.strip() for block in blocks if block.strip()
            and all(line.startswith("  ") for line in block.splitlines())
            for line in block.splitlines()]


@pytest.mark.parametrize("columns", ["80", "50"])
@pytest.mark.parametrize("name", COMMANDS)
def test_examples_are_never_wrapped(name, columns, run_cli, monkeypatch):
    """A command copied from the help must be one line, however narrow the terminal; at 80
    columns it also fits (3 columns of indent)."""
    examples = _examples(name)
    assert examples and all(e.startswith(("sbn-surgery ", "torchrun ")) for e in examples)
    monkeypatch.setenv("COLUMNS", columns)
    lines = [line.strip() for line in run_cli(name, "--help").stdout.splitlines()]
    for example in examples:
        assert example in lines, example
        assert columns != "80" or len(example) + 3 <= 80, example


@pytest.mark.parametrize("name", ["finetune", "study"])
def test_help_names_the_rarer_options_and_help_all_shows_them(name, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    command = GROUP.commands[name]
    hidden = [max(p.opts, key=len) for p in command.params if getattr(p, "hidden", False)]
    shown = [max(p.opts, key=len) for p in command.params
             if getattr(p, "param_type_name", "") == "option" and not p.hidden]
    assert len(hidden) > 20 and "--epochs" in shown and "--data" in shown
    short = run_cli(name, "--help").stdout
    full = run_cli(name, "--help-all")
    assert full.code == 0 and "Usage:" in full.stdout

    def entries(text: str) -> set[str]:  # the flags that have a row of their own
        rows = [line.split("  ")[1] for line in text.splitlines() if line.startswith("  -")]
        return {f.strip(",") for row in rows for f in row.split() if f.startswith("-")}

    assert set(hidden) & entries(short) == set()
    assert set(hidden + shown) <= entries(full.stdout)
    flat = " ".join(short.split())
    assert all(flag in flat for flag in hidden)  # named in their panel's "more" line
    assert "see --help-all" in short and "see --help-all" not in full.stdout
    assert len(short.splitlines()) < 0.7 * len(full.stdout.splitlines())
    assert max(len(line.rstrip()) for line in full.stdout.splitlines()) <= 80


def test_help_all_runs_before_any_check(run_cli):
    """--help-all is eager: it shows help even where the command's arguments are missing."""
    assert run_cli("finetune", "--help-all").code == 0
    assert run_cli("study", "--help-all").code == 0  # MODEL is required there


def test_study_help_says_what_its_options_do_in_a_study(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = run_cli("study", "--help-all").stdout
    force = next(line for line in text.splitlines() if "--force" in line)
    assert "each arm's recipe" in force and "--recipe" not in force
    epochs = next(line for line in text.splitlines() if "--epochs N" in line)
    assert "refused" in epochs and "extends" not in epochs
    finetune = run_cli("finetune", "--help-all").stdout
    assert "extends a finished run" in next(line for line in finetune.splitlines()
                                            if "--epochs N" in line)


def test_one_metavar_per_option_name_across_commands():
    """The same option in two commands reads the same (--checkpoint-key KEY, not KEY in one and
    CHECKPOINT_KEY in another), and no metavar is a parameter name in capitals."""
    from sbn_surgery_cli.help import _entry

    seen: dict[str, dict[str, list[str]]] = {}
    for name in COMMANDS:
        for p in GROUP.commands[name].params:
            if getattr(p, "param_type_name", "") != "option" or p.is_flag:
                continue
            seen.setdefault(p.name, {}).setdefault(_entry(p).rsplit(max(p.opts, key=len), 1)[1],
                                                   []).append(name)
    differ = {k: v for k, v in seen.items() if len(v) > 1}
    assert not differ, differ
    assert not [k for k, v in seen.items() for m in v if "_" in m], seen
