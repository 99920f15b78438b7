"""The options of a fine-tuning run: one typed model, the single source of truth.

:class:`RunOptions` lists every option once, with its type, range, default and help text. The CLI
(``sbn-surgery finetune`` and ``study``) builds its flags from it, the Python API takes the same
names as keywords, ``--config FILE`` and ``args.yaml`` use them as YAML keys, and validation is
the model's. Names follow timm's ``train.py`` (``opt``, ``sched``, ``smoothing``, ``model_ema``,
``mixup``, ``aa``, ``reprob``, ``drop_path``, ...); ``optimizer`` and ``label_smoothing`` are kept
as aliases.

Two kinds of option (``kind`` in each field's extra): ``run`` options define the run and are
stored in ``state.pt``; on ``--resume`` one left unset takes the stored value and one given again
must agree with it, so the resumed run is the run that was interrupted (except ``epochs``, which
may grow: that extends a finished run). ``exec`` options only change how it runs (device, AMP,
channels_last, compile, workers, --sync-stats) and are free to change.

Every field defaults to ``None`` ("not given"); :func:`resolve` fills it from the stored run, the
config file or the field's ``default`` extra, in that order of precedence below what was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, ValidationError, model_validator

from ..errors import SbnSurgeryError
from .data_options import DataOptions, option, order_fields

TrainMode = Literal["all", "norm", "sbn"]
SchedName = Literal["cosine", "step", "multistep", "plateau", "poly", "tanh"]
ClipMode = Literal["norm", "value", "agc"]
MixupMode = Literal["batch", "pair", "elem"]
BestBy = Literal["model", "ema"]
Device = Literal["auto", "cuda", "cpu"]
LrScale = Literal["linear", "sqrt"]

#: Optimizer families by their default learning rate per 256 images of global batch (the default
#: --lr-base) and weight decay.
SGD_LIKE = ("sgd", "nesterov", "momentum", "sgdp", "sgdw", "lars", "larc", "nlars", "nlarc")
LR_PER_256 = {"sgd": 0.4, "adaptive": 4e-3, "lion": 4e-4}
WEIGHT_DECAY = {"sgd": 5e-5, "adaptive": 0.05, "lion": 0.5}


def _family(opt: str) -> str:
    name = opt.lower().split("_")[-1]
    if name in SGD_LIKE or name.endswith("sgd"):
        return "sgd"
    return "lion" if "lion" in name else "adaptive"


_o = option  # a field: ``None`` until resolved; its ``default`` is what resolve() fills in


class RunOptions(DataOptions):
    """Everything that defines a fine-tuning run, and how it runs. ``None``: not given. timm's
    data flags (mean, std, crop, augmentation) are :class:`~.data_options.DataOptions`'."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False,
                              strict=True, validate_assignment=False)

    # --- model and data
    model: Optional[str] = _o(None, "A timm model name or a converted checkpoint.",
                              panel="Model and data")
    data: Optional[str] = _o(None, "digits (scikit-learn's, offline), fashion-mnist (Debian "
                             "package dataset-fashion-mnist, else downloaded), synthetic (tests), "
                             "a directory with train/ and val/ in ImageFolder layout (symbolic "
                             "links followed once per real path), or with --dataset the "
                             "dataset's root.", short="-d",
                             metavar="SOURCE", panel="Model and data")
    dataset: Optional[str] = _o(None, "timm dataset kind for --data: wds/NAME (WebDataset "
                                "shards), hfds/NAME (a local Hugging Face dataset), tar, "
                                "folder. Default: the built-in sources and ImageFolder.",
                                metavar="KIND", panel="Model and data")
    train_split: Optional[str] = _o(None, "Training split with --dataset (timm's "
                                    "conventions). [default: train]", metavar="SPLIT",
                                    panel="Model and data")
    val_split: Optional[str] = _o(None, "Validation split with --dataset. [default: "
                                  "validation]", metavar="SPLIT", panel="Model and data")
    recipe: Optional[str] = _o(None, "Recipe for a timm name: shipped name or YAML path. "
                               "Default: the shipped recipe for the model's family, else "
                               "`default`.", short="-r", metavar="NAME|FILE",
                               panel="Model and data")
    force: Optional[bool] = _o(False, "Apply --recipe even where its `models:` patterns do not "
                               "name the model.", panel="Model and data")
    checkpoint: Optional[str] = _o(None, "Trained weights for a timm name (.safetensors, "
                                   ".pth/.pth.tar, a snapshot directory, or hf-hub:ORG/NAME "
                                   "through the Hugging Face cache); without it (or "
                                   "--pretrained) training starts from timm's random init.",
                                   short="-c", metavar="FILE|DIR", panel="Model and data")
    checkpoint_key: Optional[str] = _o(None, "Where the weights sit in a --checkpoint that holds "
                                       "more than weights (e.g. state_dict_ema); default: found "
                                       "by timm's rules.", metavar="KEY", panel="Model and data")
    pretrained: Optional[bool] = _o(False, "Start from timm's pretrained weights for MODEL's tag "
                                    "(e.g. resnet50.a1_in1k; no tag: timm's default), from the "
                                    "Hugging Face cache (HF_HOME, HF_HUB_CACHE), downloaded "
                                    "there once unless HF_HUB_OFFLINE. Given in a --config "
                                    "file, the cache must hold them.", panel="Model and data")
    num_classes: Optional[int] = _o(None, "Classes of the model as built (e.g. 1000 to load an "
                                    "ImageNet --checkpoint); the head is then reset to the "
                                    "data's class count.", metavar="N", ge=1, le=1_000_000,
                                    panel="Model and data")
    model_kwargs: Optional[dict[str, Any]] = _o(None, "Extra timm create_model arguments, "
                                                "key=value; repeat.", metavar="KEY=VALUE",
                                                panel="Model and data")
    input_size: Optional[list[int]] = _o(None, "C H W of the training images. Default: 3 64 64 "
                                         "for the built-in sources; the model's own size "
                                         "otherwise.", metavar="C H W", strict=False,
                                         panel="Model and data")
    subset: Optional[int] = _o(None, "Train on a fixed N-image subset (and validate on N/5).",
                               metavar="N", ge=2, le=1 << 40, panel="Model and data")
    train: Optional[TrainMode] = _o("all", "Which parameters train: all, norm (norm layers + "
                                    "classifier) or sbn (SBN layers + classifier).",
                                    panel="Model and data")
    seed: Optional[int] = _o(0, "Seed of init, data order and augmentation.", metavar="N",
                             ge=0, le=2**63 - 1, panel="Model and data")
    # --- schedule and optimizer
    epochs: Optional[int] = _o(10, "Epochs of the schedule (cooldown epochs come after). A "
                               "larger value on resume extends a finished run.", metavar="N",
                               ge=1, le=100_000,
                               panel="Optimizer and schedule")
    batch_size: Optional[int] = _o(64, "Batch size per process.", short="-b", metavar="N",
                                   ge=2, le=65_536, panel="Optimizer and schedule")
    lr: Optional[float] = _o(None, "Peak learning rate. Default: --lr-base scaled to the global "
                             "batch (batch size x processes x --grad-accum-steps), as timm's "
                             "train.py does.", metavar="LR", gt=0, le=1e3,
                             panel="Optimizer and schedule")
    lr_base: Optional[float] = _o(None, "Learning rate for a global batch of --lr-base-size, "
                                  "when --lr is not given. Default: per 256 images, 0.4 for "
                                  "SGD-like optimizers, 4e-4 for lion, 4e-3 for the others.",
                                  metavar="LR", gt=0, le=1e3, panel="Optimizer and schedule")
    lr_base_size: Optional[int] = _o(256, "The global batch size --lr-base is for.",
                                     metavar="N", ge=1, le=1 << 30,
                                     panel="Optimizer and schedule")
    lr_base_scale: Optional[LrScale] = _o("linear", "How the default lr follows the global "
                                          "batch: linear or sqrt (timm's rule for ada*/lamb "
                                          "optimizers).", panel="Optimizer and schedule")
    opt: Optional[str] = _o("sgd", "Any timm optimizer: sgd (Nesterov), momentum, adamw, lamb, "
                            "lion, adan, ... (timm.optim.list_optimizers()).", metavar="NAME",
                            alias="optimizer", panel="Optimizer and schedule")
    momentum: Optional[float] = _o(0.9, "Momentum of SGD-like optimizers.", metavar="M", ge=0,
                                   lt=1, panel="Optimizer and schedule")
    weight_decay: Optional[float] = _o(None, "Weight decay, never on biases, norm and SBN "
                                       "parameters or the model's no_weight_decay(). Default: "
                                       "5e-5 for SGD-like, 0.5 for lion, 0.05 for the others.",
                                       metavar="WD", ge=0, le=1e3, panel="Optimizer and schedule")
    opt_eps: Optional[float] = _o(None, "Optimizer epsilon. Default: the optimizer's.",
                                  metavar="EPS", gt=0, le=1, panel="Optimizer and schedule")
    opt_betas: Optional[list[float]] = _o(None, "Optimizer betas, comma-separated (e.g. "
                                          "0.9,0.999). Default: the optimizer's.",
                                          metavar="B1,B2", strict=False,
                                          panel="Optimizer and schedule")
    clip_grad: Optional[float] = _o(None, "Clip gradients at this value (off by default).",
                                    metavar="VALUE", gt=0, le=1e6, panel="Optimizer and schedule")
    clip_mode: Optional[ClipMode] = _o("norm", "How --clip-grad clips: norm, value or agc.",
                                       panel="Optimizer and schedule")
    grad_accum_steps: Optional[int] = _o(1, "Batches whose gradients add up to one optimizer "
                                         "step.", metavar="N", ge=1, le=1024,
                                         panel="Optimizer and schedule")
    sched: Optional[SchedName] = _o("cosine", "timm scheduler: cosine, step, multistep, "
                                    "plateau, poly or tanh.", panel="Optimizer and schedule")
    sched_on_updates: Optional[bool] = _o(True, "Update the learning rate every optimizer step "
                                          "(else once an epoch, as timm's default; plateau "
                                          "always steps per epoch).",
                                          panel="Optimizer and schedule")
    min_lr: Optional[float] = _o(0.0, "Lowest learning rate of the schedule.", metavar="LR",
                                 ge=0, le=1e3, panel="Optimizer and schedule")
    warmup_lr: Optional[float] = _o(1e-5, "Learning rate the warmup starts from.",
                                    metavar="LR", ge=0, le=1e3, panel="Optimizer and schedule")
    warmup_epochs: Optional[float] = _o(1.0, "Linear warmup epochs (fractions allowed).",
                                        metavar="EPOCHS", ge=0, le=100_000,
                                        panel="Optimizer and schedule")
    cooldown_epochs: Optional[int] = _o(0, "Epochs at --min-lr after the schedule.",
                                        metavar="N", ge=0, le=100_000,
                                        panel="Optimizer and schedule")
    decay_epochs: Optional[float] = _o(90.0, "step: epochs between decays.", metavar="EPOCHS",
                                       gt=0, le=100_000, panel="Optimizer and schedule")
    decay_milestones: Optional[list[int]] = _o([90, 180, 270], "multistep: epochs of the "
                                               "decays, comma-separated.", metavar="E1,E2,...",
                                               strict=False, panel="Optimizer and schedule")
    decay_rate: Optional[float] = _o(0.1, "step/multistep/plateau: factor of each decay.",
                                     metavar="RATE", gt=0, le=1, panel="Optimizer and schedule")
    patience_epochs: Optional[int] = _o(10, "plateau: epochs without progress before a decay.",
                                        metavar="N", ge=0, le=100_000,
                                        panel="Optimizer and schedule")
    # --- regularization and augmentation
    smoothing: Optional[float] = _o(0.1, "Label smoothing.", metavar="EPS", ge=0, lt=1,
                                    alias="label_smoothing", panel="Regularization")
    mixup: Optional[float] = _o(0.0, "Mixup alpha (timm Mixup; on when > 0).", metavar="ALPHA",
                                ge=0, le=100, panel="Regularization")
    cutmix: Optional[float] = _o(0.0, "CutMix alpha (on when > 0).", metavar="ALPHA", ge=0,
                                 le=100, panel="Regularization")
    mixup_prob: Optional[float] = _o(1.0, "Probability of mixup or cutmix per batch.",
                                     metavar="P", ge=0, le=1, panel="Regularization")
    mixup_switch_prob: Optional[float] = _o(0.5, "Probability of cutmix instead of mixup when "
                                            "both are on.", metavar="P", ge=0, le=1,
                                            panel="Regularization")
    mixup_mode: Optional[MixupMode] = _o("batch", "Mixup per batch, pair or elem.",
                                         panel="Regularization")
    aa: Optional[str] = _o(None, "timm AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5 or "
                           "original (training only).", metavar="POLICY", panel="Regularization")
    reprob: Optional[float] = _o(0.0, "Random erasing probability (training only).",
                                 metavar="P", ge=0, le=1, panel="Regularization")
    augment: Optional[bool] = _o(None, "Training augmentation: timm's training transform for "
                                 "an image dataset; shifts (+ flips where label-preserving) for "
                                 "the built-in sources. Default: on for a folder or --dataset, "
                                 "off for the built-in sources; --aa/--reprob turn it on.",
                                 panel="Regularization")
    drop: Optional[float] = _o(None, "Dropout before the classifier (timm drop_rate). "
                               "Default: the model's.", metavar="P", ge=0, lt=1,
                               panel="Regularization")
    drop_path: Optional[float] = _o(None, "Stochastic depth (timm drop_path_rate). Default: "
                                    "the model's.", metavar="P", ge=0, lt=1,
                                    panel="Regularization")
    model_ema: Optional[bool] = _o(False, "Keep an exponential moving average of the weights "
                                   "and buffers (timm ModelEmaV3), evaluated every epoch and "
                                   "saved as ema.safetensors.", panel="Regularization")
    model_ema_decay: Optional[float] = _o(0.9998, "EMA decay per optimizer step.",
                                          metavar="DECAY", ge=0, lt=1, panel="Regularization")
    model_ema_warmup: Optional[bool] = _o(False, "EMA decay warmup (timm's use_warmup).",
                                          panel="Regularization")
    best_by: Optional[BestBy] = _o(None, "Which weights best.safetensors keeps: the model's or "
                                   "the EMA's (by val top-1). Default: ema with --model-ema.",
                                   panel="Regularization")
    # --- how it runs (free to change on --resume)
    amp: Optional[bool] = _o(None, "bfloat16 autocast. Default: on with CUDA, off on CPU.",
                             kind="exec", panel="Execution")
    channels_last: Optional[bool] = _o(False, "channels_last memory format.", kind="exec",
                                       panel="Execution")
    compile: Optional[bool] = _o(False, "torch.compile the model.", kind="exec",
                                 panel="Execution")
    sync_stats: Optional[bool] = _o(False, "Under torchrun: batch statistics over all ranks "
                                    "(SyncBatchNorm for BN, synchronized SBN). CUDA only.",
                                    kind="exec", panel="Execution")
    device: Optional[Device] = _o("auto", "auto (CUDA when present), cuda or cpu.",
                                  kind="exec", panel="Execution")
    workers: Optional[int] = _o(4, "Data loader processes (image folders and datasets; at most "
                                "the CPUs this process may use).", metavar="N", ge=0, le=256,
                                kind="exec", panel="Execution")

    @model_validator(mode="after")
    def _check_lists(self) -> "RunOptions":
        if self.input_size is not None:
            _check_input_size(self.input_size)
        if self.opt_betas is not None and not (
                2 <= len(self.opt_betas) <= 3 and all(0 <= b < 1 for b in self.opt_betas)):
            raise ValueError(f"--opt-betas expects 2 or 3 numbers in [0, 1), e.g. 0.9,0.999; got "
                             f"{self.opt_betas}")
        if self.decay_milestones is not None and not all(
                0 < m <= 100_000 for m in self.decay_milestones):
            raise ValueError(f"--decay-milestones expects epochs in [1, 100000]; got "
                             f"{self.decay_milestones}")
        if self.model_kwargs is not None and not all(isinstance(k, str) for k in self.model_kwargs):
            raise ValueError("--model-kwargs keys must be names")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every option, in the order of FIELDS (args.yaml's order)."""
        dumped = self.model_dump()
        return {k: dumped[k] for k in FIELDS}


FIELDS = order_fields(RunOptions.model_fields)
RUN_KEYS = tuple(k for k, f in FIELDS.items() if f.json_schema_extra["kind"] == "run")
EXEC_KEYS = tuple(k for k, f in FIELDS.items() if f.json_schema_extra["kind"] == "exec")
DEFAULTS = {k: f.json_schema_extra["default"] for k, f in FIELDS.items()
            if f.json_schema_extra["default"] is not None}
ALIASES = {f.json_schema_extra["alias"]: k for k, f in FIELDS.items()
           if f.json_schema_extra["alias"]}
#: --input-size bounds: channels, and each of height and width.
MAX_CHANNELS, MIN_SIDE, MAX_SIDE = 64, 8, 4096


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_input_size(size: Any) -> None:
    ok = isinstance(size, (list, tuple)) and len(size) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in size)
    if not ok or not (1 <= size[0] <= MAX_CHANNELS and all(MIN_SIDE <= v <= MAX_SIDE
                                                           for v in size[1:])):
        raise ValueError(f"--input-size expects C H W with 1 <= C <= {MAX_CHANNELS} and "
                         f"{MIN_SIDE} <= H, W <= {MAX_SIDE}, e.g. 3 64 64; got {size}")


def _bounds(name: str) -> str:
    """``>= 0 and < 1`` from the field's constraints."""
    parts = []
    for meta in FIELDS[name].metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value:g}")
    return " and ".join(parts)


def _message(err: dict[str, Any], where: str) -> str:
    """One pydantic error as the line a user reads: the flag, what it must be, what it got."""
    name = str(err["loc"][0]) if err["loc"] else ""
    got = err.get("input")
    kind = err["type"]
    opt = flag(name) if name in FIELDS else repr(name)
    if kind == "extra_forbidden":
        return (f"{where}unknown option {name!r}; the options are the long flags of "
                "`sbn-surgery finetune --help`, with _ for -")
    if kind in ("finite_number",):
        return f"{where}{opt} must be a finite number; got {got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where}{opt} must be an integer; got {got!r}"
    if kind in ("float_type", "float_parsing"):
        return f"{where}{opt} must be a number; got {got!r}"
    if kind.startswith(("greater_than", "less_than")):
        return f"{where}{opt} must be {_bounds(name)}; got {got}"
    if kind == "literal_error":
        choices = ", ".join(FIELDS[name].annotation.__args__[0].__args__)  # Optional[Literal]
        return f"{where}{opt} {got!r} is not one of {choices}"
    if kind == "value_error":
        return f"{where}{str(err['msg']).removeprefix('Value error, ')}"
    return f"{where}{opt}: {err['msg']} (got {got!r})"


def validate(values: dict[str, Any], where: str = "") -> RunOptions:
    """``RunOptions(**values)`` with the first error as one :class:`SbnSurgeryError` line.
    ``where``: a prefix naming the source (e.g. ``run.yaml: ``)."""
    try:
        return RunOptions(**values)
    except ValidationError as exc:
        raise SbnSurgeryError(_message(exc.errors()[0], where)) from None


def canonical(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Aliases (``optimizer``, ``label_smoothing``) renamed; tuples as lists; None dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name in out and value is not None and out[name] != _norm(value):
            raise SbnSurgeryError(f"{where}{flag(key)} and {flag(name)} are the same option; "
                                  "give one of them")
        if value is not None:
            out[name] = _norm(value)
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_norm(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def resolve(given: Union[RunOptions, dict[str, Any]], saved: Optional[dict[str, Any]] = None,
            world: int = 1, config: Optional[dict[str, Any]] = None) -> RunOptions:
    """The run's options: ``given`` (what the user set), else on resume the ``saved`` run's,
    else ``config``'s (a ``--config`` file), else the defaults; then validated. ``world``: the
    number of processes, for the default lr (the global batch is batch_size * world * the
    gradient accumulation steps)."""
    if isinstance(given, RunOptions):
        given = given.model_dump(exclude_none=True)
    given = canonical(given)
    validate(given)
    stored = canonical({k: v for k, v in (saved or {}).items() if k in FIELDS or k in ALIASES})
    merged: dict[str, Any] = {}
    conflicts = []
    for name in FIELDS:
        value = given.get(name)
        if saved is not None and FIELDS[name].json_schema_extra["kind"] == "run":
            old = stored.get(name)
            if name in given and old is not None and value != old and not (
                    name == "epochs" and value > old):
                conflicts.append(f"{flag(name)} {value!r} (stored: {old!r})")
            if name not in given:
                value = old
        if value is None and config:
            value = config.get(name)
        if value is None:
            value = DEFAULTS.get(name)
        merged[name] = value
    if conflicts:
        raise SbnSurgeryError(
            "--resume continues the stored run, but these options differ from it: "
            + "; ".join(conflicts) + ". Leave them out (or repeat the stored values; --epochs "
            "may only grow), or start a new run in another --output directory")
    opts = validate(merged)
    _check_together(opts)
    if opts.lr is None:
        opts.lr = _scaled_lr(opts, world)
    if opts.weight_decay is None:
        opts.weight_decay = WEIGHT_DECAY[_family(opts.opt)]
    if opts.best_by is None:
        opts.best_by = "ema" if opts.model_ema else "model"
    return opts


def _scaled_lr(o: RunOptions, world: int) -> float:
    """timm train.py's rule: lr_base x (global batch / lr_base_size), or its square root."""
    base, size = (o.lr_base, o.lr_base_size) if o.lr_base else (LR_PER_256[_family(o.opt)], 256)
    ratio = o.batch_size * world * o.grad_accum_steps / size
    return base * (ratio ** 0.5 if o.lr_base_scale == "sqrt" else ratio)


def _try_optimizer(o: RunOptions) -> None:
    """Build the optimizer on one parameter: a bad --opt-betas/--opt-eps fails now, not after
    the model is built."""
    import torch

    from .optim import make_optimizer

    probe = torch.nn.Linear(1, 1)
    make_optimizer(probe, o.model_copy(update={"lr": o.lr or 1e-3,
                                                "weight_decay": o.weight_decay or 0.0}))


def _check_together(o: RunOptions) -> None:
    """What no single field can check: names known to timm, options that need each other."""
    from timm.optim import list_optimizers

    if o.opt.lower() not in list_optimizers():
        raise SbnSurgeryError(f"--opt {o.opt!r} is not a timm optimizer; e.g. sgd, momentum, "
                              "adamw, lamb, lion, adan (timm.optim.list_optimizers() lists all)")
    _try_optimizer(o)
    if o.aa:
        from ..data import check_aa

        check_aa(o.aa)  # timm's own parser: a bad policy is refused before any work
    if o.warmup_epochs > o.epochs:  # == epochs: warmup only, the lr never decays
        raise SbnSurgeryError(f"--warmup-epochs must be in [0, --epochs={o.epochs}]; got "
                              f"{o.warmup_epochs:g}")
    if o.best_by == "ema" and not o.model_ema:
        raise SbnSurgeryError("--best-by ema needs --model-ema (there are no EMA weights "
                              "without it)")
    if (o.train_split or o.val_split) and not o.dataset:
        raise SbnSurgeryError("--train-split/--val-split name splits of a --dataset; give "
                              "--dataset too, or leave them out")
