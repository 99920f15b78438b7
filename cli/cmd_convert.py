"""`sbn-surgery inspect` and `sbn-surgery convert`: plan and perform the surgery."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sbn_surgery.errors import SbnSurgeryError, SurgeryError

from .common import FORCE_HELP, err_console, out, parse_kv, print_json, progress_bar

ORDER = 20

RECIPE_HELP = "A shipped recipe name (see `sbn-surgery recipes`; none: no SBN, the baseline) " \
              "or a path to a YAML recipe. Default: the shipped recipe whose `models` patterns " \
              "fit MODEL, else `default`."
CHECKPOINT_KEY_HELP = "The key of --checkpoint holding the weights, e.g. state_dict_ema in a timm " \
                      "train.py checkpoint. Default: state_dict, else model, module, state_dict_ema."
PRETRAINED_HELP = "Start from timm's pretrained weights for MODEL's tag (e.g. resnet50.a1_in1k; " \
                  "no tag: timm's default one), from the Hugging Face cache (HF_HOME, " \
                  "HF_HUB_CACHE), downloaded there once; with HF_HUB_OFFLINE=1 the cache only."
CHECKPOINT_HELP = "The model's trained weights: .safetensors, .pth/.pt/.pth.tar (read with " \
                  "weights_only=True; timm train.py checkpoints too), a Hugging Face/timm " \
                  "snapshot directory, or hf-hub:ORG/NAME (a Hub repository, through the " \
                  "cache). Without it (or --pretrained): timm's random init."
INPUT_SIZE_HELP = "C H W of the probe forward (execution order, channel counts, frequency-mode " \
                  "statistics size). Default: the model's timm input size."


def _recipe_or_auto(recipe: Optional[str], model: str) -> str:
    from sbn_surgery.recipe import recipe_for_model

    return recipe if recipe else recipe_for_model(model)


def _plan_table(plan, title: str) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right", style="dim")
    table.add_column("module (new)", style="cyan")
    table.add_column("type")
    table.add_column("channels", justify="right")
    table.add_column("mode")
    table.add_column("position")
    table.add_column("layout")
    table.add_column("stage", justify="right")
    for i, s in enumerate(plan.sites, 1):
        layout = s.layout + (f"+{s.prefix_tokens}" if s.prefix_tokens else "")
        table.add_row(str(i), s.module, s.type, str(s.channels), s.stats, s.position, layout,
                      "-" if s.stage is None else str(s.stage))
    return table


def _print_plan(plan, json_mode: bool, title: str) -> None:
    con = out(json_mode)
    if not plan.sites:
        con.print(f"No SBN layer (recipe [cyan]{plan.recipe}[/]): the model as timm builds it, "
                  "the baseline to compare SBN with.")
        return
    con.print(_plan_table(plan, title))
    con.print(f"[bold]{plan.count}[/] SBN layer(s), [bold]{plan.params_added:,}[/] parameters added "
              f"(recipe [cyan]{plan.recipe}[/]).")
    con.print("New state_dict keys: <module>.{weight, bias, running_mean, running_var, "
              "num_batches_tracked}; every original key is unchanged.")


def inspect(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
    num_classes: Optional[int] = typer.Option(None, help="Classifier size (timm's num_classes)."),
    model_kwargs: Optional[list[str]] = typer.Option(None, "--model-kwargs", help="Extra timm "
                                                     "create_model arguments as key=value; repeat."),
    input_size: Optional[tuple[int, int, int]] = typer.Option(None, help=INPUT_SIZE_HELP),
    pretrained: bool = typer.Option(False, "--pretrained", help="Plan for the model as timm "
                                    "builds it for MODEL's pretrained weights (their input "
                                    "size); the weights themselves are not needed, nor read."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Show where a recipe would put SBN in MODEL. Changes nothing and writes nothing.

    [bold]Examples[/bold]

      sbn-surgery inspect resnet50 --recipe resnet

      sbn-surgery inspect efficientnet_b0 --recipe efficientnet --json
    """
    from sbn_surgery.models import create_model
    from sbn_surgery.surgery import apply_recipe

    name = _recipe_or_auto(recipe, model)
    net = create_model(model, num_classes=num_classes, pretrained=pretrained, with_weights=False,
                       model_kwargs=parse_kv(model_kwargs, "--model-kwargs"))
    plan = apply_recipe(net, name, input_size=input_size, force=force)
    plan.model = model
    if json_out:
        print_json(plan.to_json())
    else:
        _print_plan(plan, False, f"{model} + recipe {plan.recipe}")


def convert(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet50."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the converted "
                                "checkpoint (.safetensors)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help=CHECKPOINT_HELP),
    checkpoint_key: Optional[str] = typer.Option(None, "--checkpoint-key", help=CHECKPOINT_KEY_HELP),
    pretrained: bool = typer.Option(False, "--pretrained", help=PRETRAINED_HELP),
    num_classes: Optional[int] = typer.Option(None, help="Classifier size (timm's num_classes); "
                                              "a checkpoint head of another size is left out."),
    model_kwargs: Optional[list[str]] = typer.Option(None, "--model-kwargs", help="Extra timm "
                                                     "create_model arguments as key=value; repeat."),
    init: Optional[str] = typer.Option(None, help="identity: calibrate, then make each SBN the "
                                       "identity in eval (the default with weights); standard: "
                                       "gamma=1, beta=0, or gamma=0 after a norm timm "
                                       "zero-initializes (the default without)."),
    calibrate_data: str = typer.Option("synthetic", help="Calibration images: synthetic, digits, "
                                       "fashion-mnist, or an ImageFolder directory (train/, val/)."),
    calibrate_batches: int = typer.Option(4, min=1, help="Number of calibration batches."),
    batch_size: int = typer.Option(16, min=2, help="Calibration batch size."),
    input_size: Optional[tuple[int, int, int]] = typer.Option(None, help=INPUT_SIZE_HELP),
    seed: int = typer.Option(0, help="Random seed of the weights that are not loaded (all of "
                             "them without --checkpoint or --pretrained; a new head): the same "
                             "command writes the same file."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Insert SBN into MODEL where the recipe says and write a converted checkpoint.

    The original weights load unchanged (every original key is kept) and, with identity init, the
    converted model computes the same eval output as the original. With --recipe none nothing is
    inserted: the model without SBN, the baseline that export, bench --against and diagnose take
    like any converted file.

    [bold]Examples[/bold]

      sbn-surgery convert resnet50.a1_in1k --pretrained -o r50-sbn.safetensors

      sbn-surgery convert resnet50 -r resnet -c resnet50.pth -o r50-sbn.safetensors

      sbn-surgery convert resnet50 -r none -c resnet50.pth -o r50.safetensors

      sbn-surgery convert resnet18 --num-classes 10 -o r18.safetensors --json
    """
    from sbn_surgery.checkpoint import is_converted, save_converted
    from sbn_surgery.convert import convert as do_convert
    from sbn_surgery.recipe import load_recipe
    from sbn_surgery.setup_report import SetupReport
    from timm.utils import random_seed

    if init not in (None, "identity", "standard", "auto"):
        raise SbnSurgeryError(f"--init must be identity or standard; got {init!r}")
    if output.suffix != ".safetensors":
        raise SbnSurgeryError(f"--output {output}: converted checkpoints are .safetensors files; "
                              f"use e.g. {output.with_suffix('.safetensors')}")
    if checkpoint is not None and checkpoint.endswith(".safetensors") and is_converted(checkpoint):
        raise SurgeryError(
            f"{checkpoint} is already converted; a recipe is applied once. Use it "
            "as it is (finetune/export take it), or convert the original weights.")
    kwargs = parse_kv(model_kwargs, "--model-kwargs")
    chosen = load_recipe(_recipe_or_auto(recipe, model))  # read once: a file may change
    weights = dict(checkpoint=checkpoint, pretrained=pretrained)
    random_seed(seed)  # timm's, as its train.py seeds before building the model
    calibration = None
    if calibrate_data != "synthetic" and chosen.rules:  # none: nothing to calibrate
        calibration = _calibration(model, num_classes, kwargs, input_size, calibrate_data,
                                   batch_size, calibrate_batches, weights)
    _notice(model, **weights)
    report = SetupReport()
    with progress_bar(json_out) as cb:
        net, plan = do_convert(model, chosen, checkpoint_key=checkpoint_key, **weights,
                               num_classes=num_classes,
                               model_kwargs=kwargs, init=init, calibration=calibration,
                               calibrate_batches=calibrate_batches, calibrate_batch_size=batch_size,
                               input_size=input_size, progress=cb, force=force,
                               calibration_source=calibrate_data, report=report)
    save_converted(net, output)
    plan.model = model
    _print_result(plan, report, net.sbn_meta["init"], output, json_out)


def _print_result(plan, report, init: str, output: Path, json_out: bool) -> None:
    """The plan, the head and calibration lines, the identity check and the file written."""
    checked = getattr(plan, "identity_error", None)
    if json_out:
        print_json({"output": str(output), "init": init, "identity_max_rel_err": checked,
                    **plan.to_json(), **report.to_json()})
        return
    _print_plan(plan, False, f"{plan.model} + recipe {plan.recipe}")
    _print_report(out(False), report, plan, init)
    same = "" if checked is None else f" (identity check passed: eval output within {checked:.1e})"
    out(False).print(f"init [bold]{init}[/]{same}; wrote [bold green]{output}[/]")


def _notice(model: str, **weights) -> None:
    """One line when MODEL's tag names pretrained weights that are not loaded."""
    from sbn_surgery.models import random_weights_notice

    line = random_weights_notice(model, **weights)
    if line:
        err_console.print(line, highlight=False, soft_wrap=True)


def _calibration(model: str, num_classes, kwargs: dict, input_size, source: str,
                 batch_size: int, batches: int, weights: dict) -> list:
    """Preprocessed training images of ``source`` at the model's input size (the weights'
    preprocessing, read without their tensors)."""
    from sbn_surgery.data import calibration_batches, data_config_for
    from sbn_surgery.models import create_model, input_size_of

    probe = create_model(model, num_classes=num_classes, model_kwargs=kwargs,
                         with_weights=False, **weights)
    cfg = data_config_for(probe, input_size or input_size_of(probe))
    return calibration_batches(source, cfg, batch_size, batches)


def _print_report(con, report, plan, init: str) -> None:
    """One line each: the head left out of the checkpoint, the calibration images."""
    for line in report.lines():
        con.print(line, highlight=False)
    if plan.sites and report.calibration is None:
        con.print(f"calibration: none (init {init}: SBN statistics start at mean 0, variance 1; "
                  "--calibrate-data estimates them)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Convert")(inspect)
    app.command(rich_help_panel="Convert")(convert)
