"""`sbn-surgery finetune`: convert (if needed) and fine-tune, on one device or with torchrun."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .cmd_convert import CHECKPOINT_KEY_HELP
from .common import FORCE_HELP, err_console, out, parse_kv, print_json, progress_bar

ORDER = 30

DATA_HELP = ("digits (scikit-learn's, offline), fashion-mnist (Debian package "
             "dataset-fashion-mnist, else downloaded), synthetic (tests), or a directory with "
             "train/ and val/ in ImageFolder layout. Symbolic links there are followed once "
             "per real path (a link loop adds nothing).")


def finetune(
    model: str = typer.Argument(..., help="A timm model name (converted first with --recipe) or "
                                "a converted checkpoint (.safetensors from convert/finetune)."),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe for a timm name: "
                                         "shipped name or YAML path. Default: the shipped recipe "
                                         "for the model's family, else `default`."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="Trained weights "
                                             "for a timm name (.safetensors, .pth/.pth.tar, or a "
                                             "snapshot directory); without it training starts from "
                                             "timm's random init."),
    checkpoint_key: Optional[str] = typer.Option(None, "--checkpoint-key", help=CHECKPOINT_KEY_HELP),
    num_classes: Optional[int] = typer.Option(None, help="Classes of the model as built (e.g. "
                                              "1000 to load an ImageNet --checkpoint); the head "
                                              "is then reset to the data's class count."),
    model_kwargs: Optional[list[str]] = typer.Option(None, "--model-kwargs", help="Extra timm "
                                                     "create_model arguments, key=value; repeat."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs. [default: 10]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=2,
                                             help="Batch size per process. [default: 64]"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate. [default: 0.4 (sgd) or "
                                       "4e-3 (adamw) times the global batch (batch size times "
                                       "processes) / 256]"),
    optimizer: Optional[str] = typer.Option(None, help="sgd (momentum 0.9, Nesterov) or adamw. "
                                            "[default: sgd]"),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay on conv/linear weights "
                                                 "(not biases or norms). [default: 5e-5 (sgd), "
                                                 "0.05 (adamw)]"),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warmup epochs (fractions "
                                                  "allowed), then cosine decay. [default: 1]"),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing. [default: 0.1]"),
    input_size: Optional[tuple[int, int, int]] = typer.Option(
        None, help="C H W of the training images. Default: 3 64 64 for digits, fashion-mnist and "
        "synthetic; the model's own size for a directory."),
    subset: Optional[int] = typer.Option(None, min=2, help="Train on a fixed N-image subset "
                                         "(and validate on N/5)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Training "
                                           "augmentation: timm's training transform for a "
                                           "directory; shifts (+ flips where label-preserving) "
                                           "for the built-in sources. [default: on for a "
                                           "directory, off for the built-in sources]"),
    train: Optional[str] = typer.Option(None, help="Which parameters train: all, norm (norm "
                                        "layers + classifier) or sbn (SBN layers + classifier). "
                                        "[default: all]"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bfloat16 autocast. "
                                       "[default: on with CUDA, off on CPU]"),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last memory "
                                       "format."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    sync_stats: bool = typer.Option(False, "--sync-stats", help="Under torchrun: batch "
                                    "statistics over all ranks (SyncBatchNorm for BN, synchronized "
                                    "SBN). CUDA only."),
    seed: Optional[int] = typer.Option(None, help="Seed of init, data order and augmentation. "
                                       "[default: 0]"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cuda or cpu."),
    workers: int = typer.Option(4, min=0, help="Data loader processes (ImageFolder only; at "
                                "most the CPUs this process may use)."),
    output: Path = typer.Option(Path("runs/finetune"), "--output", "-o", help="Directory for "
                                "last/best.safetensors, state.pt, metrics.jsonl, curves.png."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its "
                                "state.pt (options left out take the stored values)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start a new run in an --output "
                                   "that already holds one."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: val_top1, "
                                  "val_loss, epochs, checkpoint, images_per_s."),
) -> None:
    """Fine-tune MODEL on --data and write checkpoints, metrics and curves to --output.

    A timm name is converted first with --recipe, so convert and fine-tune are one command. On
    CUDA, AMP bf16 is on by default. Ctrl-C saves a resumable state; --resume continues it.

    [bold]Examples[/bold]

      sbn-surgery finetune resnet18 --recipe resnet --data digits --epochs 3

      sbn-surgery finetune resnet18 -d fashion-mnist --subset 5000 --json

      sbn-surgery finetune r18-sbn.safetensors -d ./imgs --train sbn -o runs/r18

      sbn-surgery finetune resnet18 --data digits -o runs/r18 --resume

      torchrun --nproc_per_node 2 -m sbn_surgery_cli finetune resnet50 -d ./imgs
    """
    from sbn_surgery.train import TrainingInterrupted
    from sbn_surgery.train import finetune as run_finetune

    main_rank = int(os.environ.get("RANK", "0")) == 0
    con = out(json_out)
    stopped = None
    with progress_bar(json_out, quiet=not main_rank) as progress:
        try:
            result = run_finetune(
                model, data, output=output, recipe=recipe, num_classes=num_classes,
                checkpoint=checkpoint, checkpoint_key=checkpoint_key, model_kwargs=parse_kv(model_kwargs, "--model-kwargs") or None,
                epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                label_smoothing=label_smoothing, input_size=input_size, subset=subset,
                augment=augment, train=train, seed=seed, amp=amp, channels_last=channels_last,
                force=force or None,  # unset: on --resume, the stored run's choice
                compile=compile, sync_stats=sync_stats, device=device, workers=workers,
                resume=resume, overwrite=overwrite, progress=progress)
        except TrainingInterrupted as stop:
            stopped = stop
    if stopped is not None:  # after the progress bar is closed, so the message is the last line
        if main_rank:
            where = f"epoch {stopped.epoch + 1}, after batch {stopped.step}"
            if stopped.saved:
                err_console.print(f"[yellow]interrupted[/] in {where}: state saved in "
                                  f"{stopped.output}; continue with the same command plus "
                                  f"--resume", highlight=False)
            else:
                err_console.print(f"[yellow]interrupted[/] in {where}; the last finished epoch "
                                  f"in {stopped.output} can be resumed", highlight=False)
        raise typer.Exit(130)
    if not main_rank:
        return
    if json_out:
        print_json(result.to_json())
        return
    top5 = "" if result.val_top5 is None else f" (top-5 {100 * result.val_top5:.2f} %)"
    con.print(f"val top-1 [bold]{100 * result.val_top1:.2f} %[/]{top5}, val loss "
              f"{result.val_loss:.4f} after "
              f"{result.epochs} epoch(s); best top-1 {100 * result.best_top1:.2f} % at epoch "
              f"{result.best_epoch}; {result.images_per_s:.0f} images/s", highlight=False)
    con.print(f"checkpoints: {result.checkpoint} (best), {result.last_checkpoint} (last); "
              f"metrics.jsonl and curves.png in {result.output}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Train")(finetune)
