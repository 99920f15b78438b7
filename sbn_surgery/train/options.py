"""The options of a fine-tuning run, their defaults, and how ``--resume`` treats them.

Options that define the run (model, data, schedule, seed, ...) are stored in ``state.pt``. On
``--resume`` an option left unset takes the stored value, and one given again must agree with it,
so the resumed run is the run that was interrupted. Options that only change how it runs (device,
AMP, channels_last, compile, workers, --sync-stats) are free to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from ..errors import SbnSurgeryError

OPTIMIZERS = ("sgd", "adamw")
TRAIN_MODES = ("all", "norm", "sbn")

#: Learning rate per 256 images of global batch (--batch-size times the processes), per
#: optimizer: scaled linearly with the global batch, as timm's train.py scales its base lr.
LR_PER_256 = {"sgd": 0.4, "adamw": 4e-3}
#: Weight decay per optimizer (never applied to biases and norm parameters).
WEIGHT_DECAY = {"sgd": 5e-5, "adamw": 0.05}


@dataclass
class RunOptions:
    """What defines a run; ``None`` means 'the default' (or, on resume, 'the stored value')."""

    model: Optional[str] = None
    data: Optional[str] = None
    recipe: Optional[str] = None
    num_classes: Optional[int] = None
    checkpoint: Optional[str] = None
    checkpoint_key: Optional[str] = None
    model_kwargs: Optional[dict] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    optimizer: Optional[str] = None
    weight_decay: Optional[float] = None
    warmup_epochs: Optional[float] = None
    label_smoothing: Optional[float] = None
    input_size: Optional[list] = None
    subset: Optional[int] = None
    augment: Optional[bool] = None  # None: data.default_augment (ImageFolder on, built-ins off)
    train: Optional[str] = None
    seed: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = dict(epochs=10, batch_size=64, optimizer="sgd", warmup_epochs=1.0,
                label_smoothing=0.1, train="all", seed=0)


def _norm(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def resolve(given: RunOptions, saved: Optional[dict[str, Any]] = None,
            world: int = 1) -> RunOptions:
    """Fill unset options from ``saved`` (resume) or the defaults, then validate. ``world``: the
    number of processes, for the default lr (the global batch is batch_size * world)."""
    out = RunOptions()
    conflicts = []
    for f in fields(RunOptions):
        value = _norm(getattr(given, f.name))
        if saved is not None and f.name in saved:
            stored = _norm(saved[f.name])
            if value is not None and stored is not None and value != stored:
                conflicts.append(f"{f.name} {value!r} (stored: {stored!r})")
            if value is None:
                value = stored
        if value is None and f.name in DEFAULTS:
            value = DEFAULTS[f.name]
        setattr(out, f.name, value)
    if conflicts:
        raise SbnSurgeryError(
            "--resume continues the stored run, but these options differ from it: "
            + "; ".join(conflicts) + ". Leave them out (or repeat the stored values), or start a "
            "new run in another --output directory"
        )
    _validate(out)
    if out.lr is None:
        out.lr = LR_PER_256[out.optimizer] * out.batch_size * world / 256
    if out.weight_decay is None:
        out.weight_decay = WEIGHT_DECAY[out.optimizer]
    return out


def _validate(o: RunOptions) -> None:
    if o.optimizer not in OPTIMIZERS:
        raise SbnSurgeryError(f"--optimizer {o.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if o.train not in TRAIN_MODES:
        raise SbnSurgeryError(f"--train {o.train!r} is not one of {', '.join(TRAIN_MODES)}: all "
                              f"parameters, norm layers + head, or SBN layers + head")
    if o.epochs < 1:
        raise SbnSurgeryError(f"--epochs must be at least 1; got {o.epochs}")
    if o.batch_size < 2:
        raise SbnSurgeryError(f"--batch-size must be at least 2 (batch statistics); got "
                              f"{o.batch_size}")
    if o.lr is not None and not o.lr > 0:
        raise SbnSurgeryError(f"--lr must be positive; got {o.lr}")
    if o.weight_decay is not None and o.weight_decay < 0:
        raise SbnSurgeryError(f"--weight-decay must be >= 0; got {o.weight_decay}")
    if o.warmup_epochs < 0 or o.warmup_epochs > o.epochs:
        raise SbnSurgeryError(f"--warmup-epochs must be in [0, --epochs={o.epochs}]; got "
                              f"{o.warmup_epochs}")
    if not 0 <= o.label_smoothing < 1:
        raise SbnSurgeryError(f"--label-smoothing must be in [0, 1); got {o.label_smoothing}")
    if o.input_size is not None and (len(o.input_size) != 3 or min(o.input_size) < 1):
        raise SbnSurgeryError(f"--input-size expects C H W, e.g. 3 64 64; got {o.input_size}")
