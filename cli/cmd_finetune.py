"""`sbn-surgery finetune`: convert (if needed) and fine-tune, on one device or with torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import err_console, main_process, out, print_json, progress_bar
from .run_options import with_run_options

ORDER = 30


def _notify(line: str) -> None:
    err_console.print(line, highlight=False, soft_wrap=True)  # one line, however long


@with_run_options(exclude=("model",))
def finetune(
    model: Optional[str] = typer.Argument(None, help="A timm model name (converted first with "
                                          "--recipe) or a converted checkpoint (.safetensors "
                                          "from convert/finetune); may come from --config."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of options (keys: "
                                          "the long flags with _ for -), e.g. a run's "
                                          "args.yaml, or the args.yaml of timm's train.py; "
                                          "flags given here win.", metavar="FILE"),
    output: Path = typer.Option(Path("runs/finetune"), "--output", "-o", help="Directory for "
                                "last/best/ema.safetensors, args.yaml, metrics.jsonl, "
                                "summary.csv, curves.png, and state.pt while the run can go "
                                "on.", metavar="PATH"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its "
                                "state.pt (options left out take the stored values; a larger "
                                "--epochs extends a finished run kept with --keep-state)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start a new run in an --output "
                                   "that already holds one."),
    keep_state: bool = typer.Option(False, "--keep-state", help="Keep state.pt when the run "
                                    "finishes, so that --resume with a larger --epochs can "
                                    "extend it (state.pt is twice the model's size; an "
                                    "interrupted run always keeps it)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: val_top1, "
                                  "val_loss, epochs, checkpoint, images_per_s, head (a reset "
                                  "head), calibration (the images SBN was calibrated on)."),
    options: Optional[dict] = None,
) -> None:
    """Fine-tune MODEL on --data and write checkpoints, metrics and curves to --output.

    A timm name is converted first with --recipe, so convert and fine-tune are one command. On
    CUDA, AMP bf16 is on by default. Ctrl-C saves a resumable state; --resume continues it.

    [bold]Examples[/bold]

      sbn-surgery finetune resnet18 --recipe resnet --data digits --epochs 3

      sbn-surgery finetune resnet18 -d fashion-mnist --subset 5000 --json

      sbn-surgery finetune resnet18 -d digits --opt lamb --model-ema --mixup 0.2

      sbn-surgery finetune --config runs/r18/args.yaml -o runs/r18-again

      sbn-surgery finetune r18-sbn.safetensors -d ./imgs --train sbn -o runs/r18

      sbn-surgery finetune resnet18 --data digits -o runs/r18 --resume

      sbn-surgery finetune resnet18 -d digits -o runs/r18 --keep-state

      sbn-surgery finetune resnet18 -d digits -o runs/r18 --resume --epochs 20

      torchrun --nproc_per_node 2 -m sbn_surgery_cli finetune resnet50 -d ./imgs
    """
    from sbn_surgery.train import TrainingInterrupted
    from sbn_surgery.train import finetune as run_finetune

    main_rank = main_process()
    con = out(json_out)
    stopped = None
    with progress_bar(json_out, quiet=not main_rank) as progress:
        try:
            result = run_finetune(model, output=output, config=config, resume=resume,
                                  overwrite=overwrite, keep_state=keep_state,
                                  progress=progress, notify=_notify, **(options or {}))
        except TrainingInterrupted as stop:
            stopped = stop
    if stopped is not None:  # after the progress bar is closed, so the message is the last line
        if main_rank:
            _print_interrupted(stopped)
        raise typer.Exit(128 + stopped.signum)  # 130 Ctrl-C, 143 SIGTERM
    if not main_rank:
        return
    if json_out:
        print_json(result.to_json())
        return
    _print_summary(con, result)


def _print_interrupted(stopped) -> None:
    where = f"epoch {stopped.epoch + 1}, after batch {stopped.step}"
    if stopped.saved:
        err_console.print(f"[yellow]interrupted[/] in {where}: state saved in {stopped.output}; "
                          "continue with the same command plus --resume", highlight=False)
    else:
        err_console.print(f"[yellow]interrupted[/] in {where}; the last finished epoch in "
                          f"{stopped.output} can be resumed", highlight=False)


def _print_summary(con, result) -> None:
    top5 = "" if result.val_top5 is None else f" (top-5 {100 * result.val_top5:.2f} %)"
    best = "EMA " if result.best_by == "ema" else ""
    con.print(f"val top-1 [bold]{100 * result.val_top1:.2f} %[/]{top5}, val loss "
              f"{result.val_loss:.4f} after "
              f"{result.epochs} epoch(s); best {best}top-1 {100 * result.best_top1:.2f} % at "
              f"epoch {result.best_epoch}; {result.images_per_s:.0f} images/s", highlight=False)
    ema = ", ema.safetensors (EMA)" if (Path(result.output) / "ema.safetensors").is_file() else ""
    state = ("state.pt (--resume with a larger --epochs extends the run), " if
             (Path(result.output) / "state.pt").is_file() else "")
    con.print(f"checkpoints: {result.checkpoint} (best), {result.last_checkpoint} (last)"
              f"{ema}; {state}args.yaml, metrics.jsonl, summary.csv and curves.png in "
              f"{result.output}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Train")(finetune)
