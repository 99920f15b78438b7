"""The fine-tuning loop: epochs of training and validation, checkpoints, resume, Ctrl-C.

Determinism: at the start of every epoch the global RNGs are seeded from (seed, epoch, rank), the
data order from (seed, epoch) and every batch's augmentation from (seed, epoch, rank, batch). A run
of E epochs therefore equals one stopped after any epoch and resumed, and a run stopped in the
middle of an epoch resumes at the next batch with the RNG state it had there.

Ctrl-C: the first SIGINT only raises a flag; the loop stops after the batch in progress (on every
rank at the same batch), writes ``last.safetensors`` and ``state.pt`` and raises
:class:`TrainingInterrupted`. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..data import build_loaders, open_source
from ..data.transforms import seed_of
from ..errors import CheckpointError, SbnSurgeryError
from . import distributed as D
from . import outputs as O
from .model import build_model, make_optimizer, make_scheduler, select_trainable
from .options import RunOptions, check_workers, resolve
from ..progress import ProgressFn


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during fine-tuning, after a resumable state was written (``state_path``)."""

    def __init__(self, output: Path, epoch: int, step: int, saved: bool) -> None:
        super().__init__(f"interrupted in epoch {epoch + 1} after batch {step}")
        self.output, self.epoch, self.step, self.saved = output, epoch, step, saved


@dataclass
class FinetuneResult:
    """Summary of a run. ``val_top1``/``val_top5`` are fractions in [0, 1] (of the last epoch)."""

    val_top1: float
    val_top5: Optional[float]  # None with 5 classes or fewer
    val_loss: float
    epochs: int
    checkpoint: str  # best.safetensors
    last_checkpoint: str
    images_per_s: float
    best_top1: float
    best_epoch: int
    output: str
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Optional[nn.Module] = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"val_top1": self.val_top1, "val_loss": self.val_loss, "epochs": self.epochs,
                "checkpoint": self.checkpoint, "images_per_s": self.images_per_s}


class _StopFlag:
    """SIGINT sets a flag (checked between batches); a second SIGINT raises at once."""

    def __init__(self) -> None:
        self.set = False
        self._old = None

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Interrupt(Exception):
    """Internal: every rank agreed to stop after the current batch."""


def finetune(
    model: Union[str, Path, nn.Module],
    data: Union[str, Path],
    *,
    output: Union[str, Path] = "runs/finetune",
    recipe: Optional[str] = None,
    num_classes: Optional[int] = None,
    checkpoint: Optional[str] = None,
    checkpoint_key: Optional[str] = None,
    model_kwargs: Optional[dict] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    weight_decay: Optional[float] = None,
    warmup_epochs: Optional[float] = None,
    label_smoothing: Optional[float] = None,
    input_size: Optional[tuple[int, int, int]] = None,
    subset: Optional[int] = None,
    augment: Optional[bool] = None,
    train: Optional[str] = None,
    seed: Optional[int] = None,
    force: Optional[bool] = None,
    amp: Optional[bool] = None,
    channels_last: bool = False,
    compile: bool = False,
    sync_stats: bool = False,
    device: Optional[str] = None,
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[ProgressFn] = None,
) -> FinetuneResult:
    """Fine-tune a converted model (a timm name is converted with ``recipe`` first) on ``data``
    and write checkpoints, state, metrics and curves into ``output``. Options left ``None`` take
    their defaults (see ``train.options``), or on ``resume`` the stored run's values; every number
    is checked (finite, in range) before any work. ``force`` applies a ``recipe`` whose ``models``
    patterns do not name the model. A non-finite training loss (or model) stops the run with an
    error naming the epoch and step; the files of the last finished epoch are kept.
    Under torchrun this runs DistributedDataParallel; only rank 0 writes."""
    out = Path(output)
    ctx = D.setup(device)
    try:
        return _run(model, data, out, ctx, locals(), progress)
    finally:
        ctx.close()


def _run(spec, data, out: Path, ctx: D.DistContext, args: dict, progress) -> FinetuneResult:
    given = RunOptions(
        model=None if isinstance(spec, nn.Module) else str(spec), data=str(data),
        **{k: args[k] for k in ("recipe", "num_classes", "checkpoint", "checkpoint_key", "model_kwargs", "epochs",
                                "batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs",
                                "label_smoothing", "input_size", "subset", "augment", "train",
                                "seed", "force")})
    check_workers(args["workers"])
    state = None
    if args["resume"]:
        state = O.load_state(out)
        opts = resolve(given, state["options"], world=ctx.world)
    else:
        if (out / O.STATE_FILE).exists() and not args["overwrite"]:
            raise CheckpointError(
                f"{out} already holds a run ({O.STATE_FILE}); continue it with --resume, or "
                f"choose another --output, or pass --overwrite to start over there"
            )
        opts = resolve(given, world=ctx.world)
    if ctx.is_main:
        _check_output_dir(out)
    else:
        progress = None

    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % 2**32)
    ds = open_source(opts.data)
    if state is not None:
        from ..checkpoint import load_converted

        # a model given as a module is resumed as that module (e.g. a study's no-SBN or no-BN
        # arm, which load_converted cannot rebuild); a name is rebuilt from last.safetensors
        net = spec if isinstance(spec, nn.Module) else load_converted(out / O.LAST_FILE)
        net.load_state_dict(state["model"])
        net, data_config = build_model(net, opts, ds, progress)
    else:
        net, data_config = build_model(spec, opts, ds, progress)
    train_loader, val_loader, _ = build_loaders(
        ds, data_config, opts.batch_size, subset=opts.subset, seed=opts.seed,
        workers=args["workers"], distributed=ctx.distributed, augment=opts.augment)

    dev = ctx.device
    amp = args["amp"] if args["amp"] is not None else dev.type == "cuda"
    mem = torch.channels_last if args["channels_last"] else torch.contiguous_format
    net = net.to(device=dev, memory_format=mem)
    if args["sync_stats"] and ctx.distributed:
        net = D.to_sync_batchnorm(net, dev)
    select_trainable(net, opts.train)
    optim = make_optimizer(net, opts)
    sched = make_scheduler(optim, opts, len(train_loader))
    scaler = torch.amp.GradScaler(dev.type, enabled=False)  # bf16 needs no loss scaling
    runner: nn.Module = net
    if ctx.distributed:
        runner = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False)
    if args["compile"]:
        runner = torch.compile(runner)

    run = _Run(opts, ctx, out, net, runner, optim, sched, scaler, train_loader, val_loader,
               amp, mem, progress)
    if state is not None:
        run.load(state)
    run.loop()
    return run.result()


def _all_finite(net: nn.Module) -> bool:
    tensors = [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def _check_output_dir(out: Path) -> None:
    """Create --output now and prove it takes a file: not after minutes of model building."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".sbn-surgery-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"--output {out} cannot hold the run's files ({exc.strerror or exc}); give a "
            "directory you can write to"
        ) from None


class _Run:
    def __init__(self, opts: RunOptions, ctx: D.DistContext, out: Path, net: nn.Module,
                 runner: nn.Module, optim, sched, scaler, train_loader, val_loader, amp: bool,
                 mem, progress) -> None:
        self.opts, self.ctx, self.out = opts, ctx, out
        self.net, self.runner = net, runner
        self.optim, self.sched, self.scaler = optim, sched, scaler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.amp, self.mem, self.progress = amp, mem, progress
        self.criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
        self.epoch, self.step = 0, 0
        self.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch = -1.0, 0
        self.rng: Optional[dict] = None
        self.stop: Optional[_StopFlag] = None

    # ------------------------------------------------------------------ state
    def load(self, state: dict[str, Any]) -> None:
        self.optim.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.best_top1, self.best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        ranks = state["ranks"]
        world = state.get("world") or len(ranks) or None  # None: a state from before "world"
        if world is not None and world != self.ctx.world:  # the schedule and shards depend on it
            raise CheckpointError(
                f"the run in {self.out} was trained with {world} process(es), this one has "
                f"{self.ctx.world}; resume it with the same number of processes (the learning-"
                "rate schedule and each process's share of the data depend on it)"
            )
        if self.step > 0:
            mine = ranks[self.ctx.rank]
            self.partial = dict(mine["partial"])
            self.rng = mine["rng"]
            if mine.get("buffers") is not None:  # this rank's own running statistics
                with torch.no_grad():
                    for b, saved in zip(D.running_buffers(self.net), mine["buffers"]):
                        b.copy_(saved)

    def _state(self, ranks: list[dict]) -> dict[str, Any]:
        return {
            "options": self.opts.to_dict(), "world": self.ctx.world,
            "epoch": self.epoch, "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optim.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "ranks": ranks,
        }

    def save(self, ranks: list[dict]) -> None:
        """last.safetensors, then state.pt (which holds the weights too, so the pair is
        consistent even if the process dies between the two writes)."""
        if not self.ctx.is_main:
            return
        O.save_checkpoint(self.net, self.out / O.LAST_FILE)
        O.save_state(self.out / O.STATE_FILE, self._state(ranks))

    def _rank_state(self) -> dict[str, Any]:
        """What a rank needs to continue mid-epoch: its partial sums, RNG and, under DDP, its
        own running statistics (the ranks' differ until the epoch's end averages them)."""
        buffers = None
        if self.ctx.distributed:
            buffers = [b.detach().cpu().clone() for b in D.running_buffers(self.net)]
        return {"partial": dict(self.partial), "rng": O.capture_rng(), "buffers": buffers}

    # ------------------------------------------------------------------ loop
    def loop(self) -> None:
        if self.ctx.is_main and self.epoch == 0 and self.step == 0:
            O.write_metrics(self.out / O.METRICS_FILE, [])
        with _StopFlag() as stop:
            self.stop = stop
            try:
                while self.epoch < self.opts.epochs:
                    self._train_epoch(stop)
                    self._end_epoch()
            except _Interrupt:
                ranks = D.gather_objects(self._rank_state(), self.ctx)
                D.average_running_stats(self.net, self.ctx)  # the checkpoint holds their mean
                self.save(ranks)
                raise TrainingInterrupted(self.out, self.epoch, self.step, True) from None
            except KeyboardInterrupt:
                saved = not self.ctx.distributed  # a lone rank cannot gather the others' state
                if saved:
                    self.save([self._rank_state()])
                raise TrainingInterrupted(self.out, self.epoch, self.step, saved) from None

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)

    def _train_epoch(self, stop: _StopFlag) -> None:
        e, loader = self.epoch, self.train_loader
        if self.step == 0:
            torch.manual_seed(seed_of(self.opts.seed, e, self.ctx.rank))
            self.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
        elif self.rng is not None:
            O.restore_rng(self.rng)
            self.rng = None
        self.runner.train()
        total = len(loader)
        desc = f"epoch {e + 1}/{self.opts.epochs}"
        dev = self.ctx.device
        p = self.partial
        if self.progress:
            self.progress(desc, self.step, total, info=self._info())
        t0 = time.perf_counter()  # images/s counts loading and the step, not the progress bar
        for x, y in loader.iter_epoch(e, start=self.step):
            x = x.to(dev, non_blocking=True).contiguous(memory_format=self.mem)
            y = y.to(dev, non_blocking=True)
            with self._autocast():
                logits = self.runner(x)
                loss = self.criterion(logits.float(), y)
            self.optim.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
            self.sched.step()
            value = loss.item()  # read for the metrics anyway: the finiteness check costs no sync
            p["loss_sum"] += value * y.numel()
            p["correct"] += (logits.argmax(1) == y).sum().item()
            p["seen"] += y.numel()
            p["time"] += time.perf_counter() - t0
            self.step += 1
            if self.progress:
                self.progress(desc, self.step, total, info=self._info())
            bad = not math.isfinite(value)
            if D.any_rank(stop.set or bad, self.ctx):  # one agreement a step, as before
                if D.any_rank(bad, self.ctx):
                    raise self._diverged(f"the training loss is {value} at step {self.step} of "
                                         f"{total}")
                raise _Interrupt
            t0 = time.perf_counter()

    def _diverged(self, what: str) -> SbnSurgeryError:
        """The error that stops a run whose model went non-finite. Nothing of this epoch is
        written: last.safetensors and state.pt stay those of the last finished epoch, and
        best.safetensors is never a non-finite model."""
        done = f"epoch {self.epoch}" if self.epoch else "none yet"
        return SbnSurgeryError(
            f"training diverged in epoch {self.epoch + 1}: {what}. Nothing of this epoch was "
            f"written; {self.out} keeps the last finished epoch ({done}). Start again with a "
            f"lower --lr (this run: {self.opts.lr:g}) or more --warmup-epochs.")

    def _info(self) -> str:
        p = self.partial
        if not p["seen"]:
            return ""
        ips = p["seen"] * self.ctx.world / max(p["time"], 1e-9)
        return (f"loss {p['loss_sum'] / p['seen']:.3f}  acc {100 * p['correct'] / p['seen']:.1f}%"
                f"  {ips:.0f} img/s")

    def _end_epoch(self) -> None:
        p = self.partial
        loss_sum, correct, seen = D.all_reduce_sum([p["loss_sum"], p["correct"], p["seen"]],
                                                   self.ctx)
        train_time = max(D.all_reduce_sum([p["time"]], self.ctx)[0] / self.ctx.world, 1e-9)
        D.average_running_stats(self.net, self.ctx)
        if not _all_finite(self.net):  # one sync an epoch: never validate or save a NaN model
            raise self._diverged("the weights or running statistics are no longer finite")
        val_loss, top1, top5 = self._evaluate()
        row = {"epoch": self.epoch + 1, "loss": loss_sum / max(seen, 1),
               "train_top1": correct / max(seen, 1), "val_loss": val_loss, "top1": top1,
               "top5": top5, "images_per_s": seen / train_time, "lr": self.optim.param_groups[0]["lr"],
               "images": int(seen), "train_time_s": train_time}
        improved = top1 > self.best_top1
        if improved and self.ctx.is_main:
            O.save_checkpoint(self.net, self.out / O.BEST_FILE)
        # The epoch counts as done only from here: a second Ctrl-C above leaves the state at the
        # end of its training, so resume validates it again and best.safetensors matches.
        self.history.append(row)
        if improved:
            self.best_top1, self.best_epoch = top1, self.epoch + 1
        self.epoch += 1
        self.step = 0
        if self.ctx.is_main:
            self.save([])
            O.write_metrics(self.out / O.METRICS_FILE, self.history)
            O.plot_curves(self.out / O.CURVES_FILE, self.history, self._title())

    def _title(self) -> str:
        meta = getattr(self.net, "sbn_meta", {}) or {}
        return f"{meta.get('model_name', 'model')} + SBN ({meta.get('recipe_name', '?')}) on {self.opts.data}"

    def _evaluate(self) -> tuple[float, float, Optional[float]]:
        """Validation loss, top-1 and top-5 (None with 5 classes or fewer, where it is 1)."""
        net, loader, dev = self.net, self.val_loader, self.ctx.device
        was = net.training
        net.eval()
        classes = int(getattr(net, "num_classes", 0) or 0)
        k = 5 if classes > 5 else 1
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, count
        total = len(loader)
        desc = f"val {self.epoch + 1}/{self.opts.epochs}"
        try:
            with torch.no_grad():
                for i, (x, y) in enumerate(loader.iter_epoch(0)):
                    x = x.to(dev).contiguous(memory_format=self.mem)
                    y = y.to(dev)
                    with self._autocast():
                        logits = net(x)
                    logits = logits.float()
                    sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                    topk = logits.topk(k, dim=1).indices
                    sums[1] += (topk[:, 0] == y).sum().item()
                    sums[2] += (topk == y.view(-1, 1)).any(1).sum().item()
                    sums[3] += y.numel()
                    if self.progress:
                        self.progress(desc, i + 1, total)
                    # saved as after the epoch's training: resume validates it again
                    if self.stop is not None and D.any_rank(self.stop.set, self.ctx):
                        raise _Interrupt
        finally:
            net.train(was)
        loss, c1, c5, n = D.all_reduce_sum(sums, self.ctx)
        n = max(n, 1.0)
        return loss / n, c1 / n, (c5 / n if classes > 5 else None)

    # ------------------------------------------------------------------ summary
    def result(self) -> FinetuneResult:
        last = self.history[-1] if self.history else {}
        images = sum(r.get("images", 0) for r in self.history)
        secs = sum(r.get("train_time_s", 0.0) for r in self.history)
        return FinetuneResult(
            val_top1=float(last.get("top1", 0.0)),
            val_top5=None if last.get("top5") is None else float(last["top5"]),
            val_loss=float(last.get("val_loss", float("nan"))), epochs=len(self.history),
            checkpoint=str(self.out / O.BEST_FILE), last_checkpoint=str(self.out / O.LAST_FILE),
            images_per_s=images / secs if secs else 0.0, best_top1=self.best_top1,
            best_epoch=self.best_epoch, output=str(self.out), history=list(self.history),
            model=self.net)
