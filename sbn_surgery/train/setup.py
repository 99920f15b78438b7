"""Setting a run up: options resolved, the model, data and its parts built, then the loop.

``finetune`` is the one entry point (the CLI's ``finetune`` and ``study`` call it); what happens
epoch by epoch is :mod:`.loop`'s.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..data import build_loaders, open_source
from ..data.transforms import TRAIN_FLAGS
from ..errors import CheckpointError, SbnSurgeryError
from ..hub import is_hub_id
from ..progress import ProgressFn
from ..setup_report import SetupReport
from . import distributed as D
from . import outputs as O
from .config import load_config
from .loop import FinetuneResult, _Parts, _Run
from .model import build_model, eval_preprocessing, record_preprocessing, select_trainable
from .optim import make_ema
from .options import ALIASES, DEFAULTS, FIELDS, RunOptions, resolve


def finetune(
    model: Union[str, Path, nn.Module, None] = None,
    data: Union[str, Path, None] = None,
    *,
    output: Union[str, Path] = "runs/finetune",
    config: Union[str, Path, None] = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_state: bool = False,
    progress: Optional[ProgressFn] = None,
    notify: Optional[Callable[[str], None]] = None,
    on_epoch: Optional[Callable[[nn.Module, int], None]] = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune a converted model (a timm name is converted with ``recipe`` first) on ``data``
    and write checkpoints, state, metrics, ``summary.csv``, ``args.yaml`` and curves into
    ``output``. ``options``: the fields of :class:`~sbn_surgery.train.options.RunOptions` (timm
    train.py's names: ``opt``, ``sched``, ``model_ema``, ``mixup``, ``aa``, ...). Options left
    out take, in this order, the stored run's values on ``resume``, ``config``'s (a YAML file,
    e.g. an earlier run's ``args.yaml``, or timm train.py's: ``notify`` gets one line naming
    its options that have no equivalent here), or their defaults; every value is checked before any
    work. ``resume`` with a larger ``epochs`` extends a finished run (the schedule is recomputed
    for the new total; ``notify`` gets one line saying so). A non-finite training loss (or
    model) stops the run with an error naming the epoch and step; the files of the last
    finished epoch are kept. Under torchrun this runs DistributedDataParallel; only rank 0
    writes. ``on_epoch(model, epoch)`` is called after each epoch's validation and before that
    epoch is saved (a resumed run calls it again for an epoch it repeats), on every process at
    once (a forward pass of a model with synchronized norm layers needs them all); it must not
    change the model. A finished run removes its ``state.pt`` unless ``keep_state`` (then a
    later ``resume`` with a larger ``epochs`` can extend it); an interrupted one always keeps
    it."""
    unknown = sorted(set(options) - set(FIELDS) - set(ALIASES))
    if unknown:
        raise TypeError(f"finetune() got unexpected options: {', '.join(unknown)}")
    out = Path(output)
    cfg, notes = load_config(config) if config else (None, [])
    ctx = D.setup(options.get("device") or (cfg or {}).get("device"))
    say = (notify or _silent) if ctx.is_main else _silent  # one voice under torchrun
    for line in notes:  # e.g. a timm args.yaml's options that have no equivalent here
        say(line)
    try:
        with contextlib.ExitStack() as held:  # the output directory's lock, once taken
            return _run(model, data, out, ctx, options, cfg,
                        dict(resume=resume, overwrite=overwrite, keep_state=keep_state,
                             progress=progress, notify=say, on_epoch=on_epoch, held=held))
    finally:
        ctx.close()


def _silent(line: str) -> None:
    """Where no one listens: ``notify`` not given, or not the main process."""


def _signature() -> inspect.Signature:
    """finetune's signature with every option as a keyword (for help() and editors)."""
    base = inspect.signature(finetune)
    params = [p for p in base.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=f.annotation)
               for name, f in FIELDS.items() if name not in ("model", "data")]
    return base.replace(parameters=params)


finetune.__signature__ = _signature()  # type: ignore[attr-defined]


def _resolve(spec, data, out: Path, ctx: D.DistContext, options: dict,
             cfg: Optional[dict[str, Any]], how: dict):
    """(options, stored state or None, whether --epochs extends the stored run)."""
    given = dict(options)
    if spec is not None and not isinstance(spec, nn.Module):
        given["model"] = str(spec)
    if data is not None:
        given["data"] = str(data)
    state, extended = None, False
    if how["resume"]:
        state = O.load_state(out)
        opts = resolve(given, state["options"], world=ctx.world, config=cfg)
        extended = opts.epochs > int(state["options"].get("epochs") or opts.epochs)
    else:
        if O.holds_run(out) and not how["overwrite"]:
            go_on = "continue it with --resume" if (out / O.STATE_FILE).exists() else \
                f"it finished (no {O.STATE_FILE} to continue from)"
            raise CheckpointError(
                f"{out} already holds a run; {go_on}, or choose another --output, or pass "
                f"--overwrite to start over there"
            )
        opts = resolve(given, world=ctx.world, config=cfg)
    if opts.data is None:
        raise SbnSurgeryError("no --data: give the data source (e.g. --data digits), or a "
                              "--config file that names it")
    if opts.model is None and not isinstance(spec, nn.Module):
        raise SbnSurgeryError("no MODEL: give a timm model name or a converted checkpoint, or a "
                              "--config file that names it")
    return opts, state, extended


def _data_kwargs(opts: RunOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in ("dataset", "train_split", "val_split")}


def _run(spec, data, out: Path, ctx: D.DistContext, options: dict,
         cfg: Optional[dict[str, Any]], how: dict) -> FinetuneResult:
    opts, state, extended = _resolve(spec, data, out, ctx, options, cfg, how)
    progress = how["progress"] if ctx.is_main else None
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % 2**32)
    ds = open_source(opts.data, **_data_kwargs(opts))  # a bad --data fails before --output exists
    if ctx.is_main:  # one run at a time in --output; a killed one's temporary files go
        how["held"].enter_context(O.run_lock(out))
        if opts.sync_stats and not ctx.distributed:
            how["notify"]("--sync-stats synchronizes batch statistics across torchrun's "
                          "processes; this run has one process, so it changes nothing")
        if opts.amp and ctx.device.type == "cpu":
            how["notify"]("--amp on CPU: bfloat16 autocast is often many times slower than "
                          "float32 on CPUs without bfloat16 matrix units; leave it off on CPU "
                          "unless you have measured otherwise")
        if extended:
            how["notify"](f"extending the run in {out} from {state['options']['epochs']} to "
                          f"{opts.epochs} epochs: the learning-rate schedule is recomputed for "
                          f"the new total (recorded as schedule_epochs in {O.METRICS_FILE})")
        _data_notices(spec, opts, ds, {**(cfg or {}), **options}, state, how["notify"])
    net = spec if isinstance(spec, nn.Module) else opts.model
    if state is not None:
        from ..checkpoint import load_converted

        # a model given as a module is resumed as that module (e.g. a study's no-SBN or no-BN
        # arm, which load_converted cannot rebuild); a name is rebuilt from last.safetensors
        net = net if isinstance(net, nn.Module) else load_converted(out / O.LAST_FILE)
        net.load_state_dict(state["model"])
    # a download only when asked for here (an argument, a flag), never by a --config file
    download = bool(options.get("pretrained")) or is_hub_id(options.get("checkpoint"))
    report = SetupReport()
    net, data_config = build_model(net, opts, ds, progress, download=download, report=report)
    for line in report.lines():  # the head reset and the calibration images, as they happened
        how["notify"](line)
    # before the EMA copy is made; what validation really does, which export writes
    record_preprocessing(net, eval_preprocessing(ds, data_config), ds.classes)
    train_loader, val_loader, _ = build_loaders(
        ds, data_config, opts.batch_size, subset=opts.subset, seed=opts.seed,
        workers=opts.workers, distributed=ctx.distributed, augment=opts.augment, aa=opts.aa,
        reprob=opts.reprob, train_flags={k: getattr(opts, k) for k in TRAIN_FLAGS})
    run = _Run(opts, ctx, out, _prepare(net, opts, ctx), train_loader, val_loader, progress)
    run.on_epoch = how["on_epoch"]
    if ctx.is_main:  # once every option has proven workable: a failed start replaces nothing
        O.write_args(out / O.ARGS_FILE, opts.to_dict())
        if state is None:  # --overwrite: from here the folder is this run's, and a state.pt
            O.drop_state(out, keep=False)  # left by the one before would --resume that one
    if state is not None:
        run.load(state, extended)
    run.loop()
    if ctx.is_main:
        O.drop_state(out, how["keep_state"])
    result = run.result()
    result.setup = report
    return result


def _data_notices(spec, opts: RunOptions, ds, given: dict[str, Any], state,
                  notify: Callable[[str], None]) -> None:
    """Lines on the weights and data flags the run was given: a name whose tag names
    pretrained weights that are not loaded; timm's flags for images read from files, set to
    other than their defaults, on an in-memory source, where they change nothing."""
    from ..models import random_weights_notice
    from .model import is_checkpoint_path

    if state is None and isinstance(opts.model, str) and not isinstance(spec, nn.Module) \
            and not is_checkpoint_path(opts.model):
        line = random_weights_notice(opts.model, pretrained=bool(opts.pretrained),
                                     checkpoint=opts.checkpoint)
        if line:
            notify(line)
    idle = [f"--{k.replace('_', '-')}" for k in (*TRAIN_FLAGS, "crop_pct", "crop_mode")
            if given.get(k) is not None and given[k] != DEFAULTS.get(k)]
    if ds.kind == "tensor" and idle:
        notify(f"{', '.join(idle)} shape timm's transforms of images read from files; "
               f"{ds.name} is held in memory and augmented by shifts (and flips where they keep "
               "the label), so they change nothing here")


def _prepare(net: nn.Module, opts: RunOptions, ctx: D.DistContext) -> _Parts:
    dev = ctx.device
    amp = opts.amp if opts.amp is not None else dev.type == "cuda"
    mem = torch.channels_last if opts.channels_last else torch.contiguous_format
    net = net.to(device=dev, memory_format=mem)
    if opts.sync_stats and ctx.distributed:
        net = D.to_sync_batchnorm(net, dev)
    select_trainable(net, opts.train)
    ema = make_ema(net, opts)
    runner: nn.Module = net
    if ctx.distributed:
        runner = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev] if dev.type == "cuda" else None, **D.rank_local_buffers())
    if opts.compile:
        runner = torch.compile(runner)
    return _Parts(net, runner, amp, mem, ema)
