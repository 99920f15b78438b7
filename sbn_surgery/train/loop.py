"""The fine-tuning loop: epochs of training and validation, checkpoints, resume, Ctrl-C.

Determinism: at the start of every epoch the global RNGs are seeded from (seed, epoch, rank), the
data order from (seed, epoch) and every batch's augmentation from (seed, epoch, rank, batch). A run
of E epochs therefore equals one stopped after any epoch and resumed, and a run stopped in the
middle of an epoch resumes at the next batch with the RNG state it had there.

Ctrl-C and SIGTERM (what SLURM and Kubernetes send before preempting a job): the first only
raises a flag; the loop stops after the optimizer step in progress, on every rank at the same
step (the flag is all-reduced once a step), writes ``last.safetensors`` and ``state.pt`` with the
partial epoch and raises :class:`TrainingInterrupted`; ``--resume`` goes on from there. A second
signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..data.transforms import seed_of
from ..errors import CheckpointError, SbnSurgeryError
from ..setup_report import SetupReport
from . import distributed as D
from . import outputs as O
from .optim import (clip_gradients, load_scheduler_state, make_criterion, make_mixup, make_optimizer, make_scheduler, scheduler_state,
                    updates_on_steps)
from .options import RunOptions
from .stop import StopFlag as _StopFlag


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during fine-tuning (``signum``), after a resumable state was written
    into ``output`` (``saved``)."""

    def __init__(self, output: Path, epoch: int, step: int, saved: bool,
                 signum: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted in epoch {epoch + 1} after batch {step}")
        self.output, self.epoch, self.step, self.saved = output, epoch, step, saved
        self.signum = int(signum)


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
    best_by: str = "model"  # whose val top-1 best_top1 is: the model's or the EMA's
    model: Optional[nn.Module] = field(default=None, repr=False)
    setup: SetupReport = field(default_factory=SetupReport)  # head reset, calibration images

    def to_json(self) -> dict[str, Any]:
        return {"val_top1": self.val_top1, "val_loss": self.val_loss, "epochs": self.epochs,
                "checkpoint": self.checkpoint, "images_per_s": self.images_per_s,
                **self.setup.to_json()}


class _Interrupt(Exception):
    """Internal: every rank agreed to stop after the current batch."""


@dataclass
class _Parts:
    """The model as trained (``net``), as called (``runner``: DDP and/or compiled) and what
    trains it."""

    net: nn.Module
    runner: nn.Module
    amp: bool
    mem: Any
    ema: Optional[Any] = None


def _fresh_partial() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0, "lr_sum": 0.0,
            "updates": 0.0}


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def _all_finite(net: nn.Module) -> bool:
    tensors = [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


class _Run:
    def __init__(self, opts: RunOptions, ctx: D.DistContext, out: Path, parts: _Parts,
                 train_loader, val_loader, progress) -> None:
        self.opts, self.ctx, self.out = opts, ctx, out
        self.net, self.runner, self.ema = parts.net, parts.runner, parts.ema
        self.amp, self.mem, self.progress = parts.amp, parts.mem, progress
        self.train_loader, self.val_loader = train_loader, val_loader
        self.accum = opts.grad_accum_steps
        self.updates_per_epoch = max(1, math.ceil(len(train_loader) / self.accum))
        self.optim = make_optimizer(self.net, opts)
        self.sched, self.total_epochs = make_scheduler(self.optim, opts, self.updates_per_epoch)
        classes = int(getattr(self.net, "num_classes", 0) or train_loader.dataset.num_classes)
        self.mixup = make_mixup(opts, classes)
        self.criterion = make_criterion(opts, self.mixup)
        self.epoch, self.step = 0, 0
        self.partial = _fresh_partial()
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch = -1.0, 0
        self.rng: Optional[dict] = None
        self.stop: Optional[_StopFlag] = None
        self.on_epoch = None  # finetune's on_epoch(model, epoch), on every rank

    # ------------------------------------------------------------------ state
    def load(self, state: dict[str, Any], extended: bool = False) -> None:
        """Continue ``state``. The optimizer holds the learning rate of the next step; a timm
        schedule is a function of the update count (plateau's counters are restored)."""
        self.optim.load_state_dict(state["optimizer"])
        load_scheduler_state(self.sched, state.get("scheduler") or {})
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
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
        if extended:  # the lr of the next step follows the recomputed schedule
            self._schedule_update(self.epoch * self.updates_per_epoch)
        if self.step > 0:
            mine = ranks[self.ctx.rank]
            self.partial = {**_fresh_partial(), **mine["partial"]}
            self.rng = mine["rng"]
            if mine.get("buffers") is not None:  # this rank's own running statistics
                with torch.no_grad():
                    for b, saved in zip(D.running_buffers(self.net), mine["buffers"]):
                        b.copy_(saved)

    def _state(self, ranks: list[dict]) -> dict[str, Any]:
        return {
            "options": self.opts.to_dict(), "world": self.ctx.world,
            "epoch": self.epoch, "step": self.step,
            "model": _cpu_state(self.net),
            "ema": None if self.ema is None else _cpu_state(self.ema.module),
            "optimizer": self.optim.state_dict(), "scheduler": scheduler_state(self.sched),
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
        with _StopFlag() as stop:  # from here a signal stops the run with its state saved
            self.stop = stop
            if self.ctx.is_main and self.epoch == 0 and self.step == 0:
                O.write_metrics(self.out / O.METRICS_FILE, [])
            try:
                while self.epoch < self.total_epochs:
                    self._train_epoch(stop)
                    self._end_epoch()
            except _Interrupt:
                ranks = D.gather_objects(self._rank_state(), self.ctx)
                D.average_running_stats(self.net, self.ctx)  # the checkpoint holds their mean
                self.save(ranks)
                raise TrainingInterrupted(self.out, self.epoch, self.step, True,
                                          stop.signum) from None
            except KeyboardInterrupt:
                saved = not self.ctx.distributed  # a lone rank cannot gather the others' state
                if saved:
                    self.save([self._rank_state()])
                raise TrainingInterrupted(self.out, self.epoch, self.step, saved,
                                          stop.signum) from None

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)

    def _begin_epoch(self) -> None:
        e = self.epoch
        if self.step == 0:
            torch.manual_seed(seed_of(self.opts.seed, e, self.ctx.rank))
            np.random.seed(seed_of(self.opts.seed, e, self.ctx.rank) % 2**32)  # timm's Mixup
            self.partial = _fresh_partial()
        elif self.rng is not None:
            O.restore_rng(self.rng)
            self.rng = None
        self.runner.train()

    def _train_epoch(self, stop: _StopFlag) -> None:
        self._begin_epoch()
        loader, total, dev = self.train_loader, len(self.train_loader), self.ctx.device
        desc = f"epoch {self.epoch + 1}/{self.total_epochs}"
        p = self.partial
        if self.progress:
            self.progress(desc, self.step, total, info=self._info())
        bad = None
        t0 = time.perf_counter()  # images/s counts loading and the step, not the progress bar
        # closed on any way out: the loader's workers end now, not when the exception is
        # collected (a worker outlives a SIGTERM by a grace period)
        with contextlib.closing(loader.iter_epoch(self.epoch, start=self.step)) as batches:
            for x, y in batches:
                x = x.to(dev, non_blocking=True).contiguous(memory_format=self.mem)
                y = y.to(dev, non_blocking=True)
                update = (self.step + 1) % self.accum == 0 or self.step + 1 == total
                logits, y, value = self._forward_backward(x, y, update, total)
                if update:
                    self._optimizer_step()
                p["loss_sum"] += value * y.numel()
                p["correct"] += (logits.argmax(1) == y).sum().item()
                p["seen"] += y.numel()
                p["time"] += time.perf_counter() - t0
                self.step += 1
                if self.progress:
                    self.progress(desc, self.step, total, info=self._info())
                if not math.isfinite(value) and bad is None:
                    bad = f"the training loss is {value} at step {self.step} of {total}"
                # ranks agree once an optimizer step: stop (or fail) only between updates
                if update and D.any_rank(stop.set or bad is not None, self.ctx):
                    if D.any_rank(bad is not None, self.ctx):
                        raise self._diverged(bad or "the training loss is not finite on another "
                                             "process")
                    raise _Interrupt
                t0 = time.perf_counter()

    def _forward_backward(self, x, y, update: bool, total: int):
        """One batch's loss and gradients (added up over --grad-accum-steps batches). With
        mixup, a batch of odd size leaves out its last image (timm's Mixup pairs images)."""
        if self.mixup is not None:
            if len(x) % 2:
                x, y = x[:-1], y[:-1]
            x, target = self.mixup(x, y)
        else:
            target = y
        group = self.step // self.accum
        size = min(self.accum, total - group * self.accum)  # the last group may be shorter
        sync = update or not isinstance(self.runner, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else self.runner.no_sync():
            with self._autocast():
                logits = self.runner(x)
                loss = self.criterion(logits.float(), target)
            (loss / size).backward()
        return logits.detach(), y, loss.item()

    def _optimizer_step(self) -> None:
        clip_gradients([q for q in self.net.parameters() if q.requires_grad], self.opts)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        updates = self.epoch * self.updates_per_epoch + math.ceil((self.step + 1) / self.accum)
        if self.ema is not None:
            self.ema.update(self.net, step=updates)
        self.partial["lr_sum"] += self.optim.param_groups[0]["lr"]
        self.partial["updates"] += 1
        self._schedule_update(updates)

    def _schedule_update(self, updates: int) -> None:
        if updates_on_steps(self.opts):
            self.sched.step_update(num_updates=updates)

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
        if self.ema is not None:
            D.average_running_stats(self.ema.module, self.ctx)
        if not _all_finite(self.net):  # one sync an epoch: never validate or save a NaN model
            raise self._diverged("the weights or running statistics are no longer finite")
        row = {"epoch": self.epoch + 1, "loss": loss_sum / max(seen, 1),
               "train_top1": correct / max(seen, 1)}
        row["val_loss"], row["top1"], row["top5"] = self._evaluate(self.net)
        if self.ema is not None:
            row["ema_val_loss"], row["ema_top1"], row["ema_top5"] = self._evaluate(
                self.ema.module, "ema val")
        row.update({"images_per_s": seen / train_time,
                    "lr": p["lr_sum"] / max(p["updates"], 1), "images": int(seen),
                    "train_time_s": train_time, "schedule_epochs": self.total_epochs})
        self._finish_epoch(row)

    def _finish_epoch(self, row: dict[str, Any]) -> None:
        if self.on_epoch is not None:  # before the epoch is saved: a resume repeats it; every
            # rank at once, so the model's synchronized norm layers may run
            self.on_epoch(self.net, self.epoch + 1)
        by_ema = self.opts.best_by == "ema"
        top1 = row["ema_top1"] if by_ema else row["top1"]
        improved = top1 > self.best_top1
        if self.ctx.is_main:
            if self.ema is not None:
                O.save_checkpoint(self.ema.module, self.out / O.EMA_FILE)
            if improved:
                O.save_checkpoint(self.ema.module if by_ema else self.net,
                                  self.out / O.BEST_FILE)
        if self.opts.sched == "plateau" or not updates_on_steps(self.opts):
            self.sched.step(self.epoch + 1, top1)
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
            O.write_summary(self.out / O.SUMMARY_FILE, self.history)
            O.plot_curves(self.out / O.CURVES_FILE, self.history, self._title())

    def _title(self) -> str:
        meta = getattr(self.net, "sbn_meta", {}) or {}
        return f"{meta.get('model_name', 'model')} + SBN ({meta.get('recipe_name', '?')}) on {self.opts.data}"

    def _evaluate(self, net: nn.Module, what: str = "val") -> tuple[float, float, Optional[float]]:
        """Validation loss, top-1 and top-5 (None with 5 classes or fewer, where it is 1)."""
        loader, dev = self.val_loader, self.ctx.device
        was = net.training
        net.eval()
        classes = int(getattr(net, "num_classes", 0) or 0)
        k = 5 if classes > 5 else 1
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, count
        total = len(loader)
        desc = f"{what} {self.epoch + 1}/{self.total_epochs}"
        try:
            # closed on any way out: its loader workers end now (see _train_epoch)
            with torch.no_grad(), contextlib.closing(loader.iter_epoch(0)) as batches:
                for i, (x, y) in enumerate(batches):
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
            best_by=self.opts.best_by,
            model=self.net)
