"""The options of a fine-tuning run, their defaults, and how ``--resume`` treats them.

Options that define the run (model, data, schedule, seed, ...) are stored in ``state.pt``. On
``--resume`` an option left unset takes the stored value, and one given again must agree with it,
so the resumed run is the run that was interrupted. Options that only change how it runs (device,
AMP, channels_last, compile, workers, --sync-stats) are free to change.
"""

from __future__ import annotations

import math
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
    #: apply ``recipe`` even where its ``models`` patterns do not name ``model``
    force: Optional[bool] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = dict(epochs=10, batch_size=64, optimizer="sgd", warmup_epochs=1.0,
                label_smoothing=0.1, train="all", seed=0, force=False)


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


#: option -> (type, lowest, highest, whether the highest is excluded); None: no bound.
#: Every number is also finite (inf and nan are refused).
_BOUNDS: dict[str, tuple[type, Optional[float], Optional[float], bool]] = {
    "num_classes": (int, 1, 1_000_000, False),
    "epochs": (int, 1, 100_000, False),
    "batch_size": (int, 2, 65_536, False),  # 2: batch statistics need two images
    "lr": (float, 0, 1e3, False),  # lowest excluded below: lr > 0
    "weight_decay": (float, 0, 1e3, False),
    "warmup_epochs": (float, 0, None, False),  # at most --epochs: checked below
    "label_smoothing": (float, 0, 1, True),
    "subset": (int, 2, 1 << 40, False),  # 2: one image to train on and one to validate
    "seed": (int, 0, 2**63 - 1, False),
}
#: --input-size bounds: channels, and each of height and width.
MAX_CHANNELS, MIN_SIDE, MAX_SIDE = 64, 8, 4096


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(name: str, value: Any) -> None:
    kind, low, high, open_high = _BOUNDS[name]
    ok_type = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise SbnSurgeryError(f"{_flag(name)} must be {'an integer' if kind is int else 'a number'}"
                              f"; got {value!r}")
    if not math.isfinite(value):
        raise SbnSurgeryError(f"{_flag(name)} must be a finite number; got {value}")
    above = value > low if name == "lr" else value >= low
    below = value < high if open_high else value <= high if high is not None else True
    if not (above and below):
        lo = f"> {low}" if name == "lr" else f">= {low}"
        hi = "" if high is None else f" and {'<' if open_high else '<='} {high:g}"
        raise SbnSurgeryError(f"{_flag(name)} must be {lo}{hi}; got {value}")


def _validate(o: RunOptions) -> None:
    """Every option in range (see :data:`_BOUNDS`), so a run never trains on a NaN lr."""
    if o.optimizer not in OPTIMIZERS:
        raise SbnSurgeryError(f"--optimizer {o.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if o.train not in TRAIN_MODES:
        raise SbnSurgeryError(f"--train {o.train!r} is not one of {', '.join(TRAIN_MODES)}: all "
                              f"parameters, norm layers + head, or SBN layers + head")
    for name in _BOUNDS:
        if getattr(o, name) is not None:
            _check_number(name, getattr(o, name))
    if o.warmup_epochs > o.epochs:  # == epochs: warmup only, the lr never decays
        raise SbnSurgeryError(f"--warmup-epochs must be in [0, --epochs={o.epochs}]; got "
                              f"{o.warmup_epochs}")
    if o.input_size is not None:
        _check_input_size(o.input_size)


def _check_input_size(size: Any) -> None:
    ok = isinstance(size, (list, tuple)) and len(size) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in size)
    if not ok or not (1 <= size[0] <= MAX_CHANNELS and all(MIN_SIDE <= v <= MAX_SIDE
                                                           for v in size[1:])):
        raise SbnSurgeryError(f"--input-size expects C H W with 1 <= C <= {MAX_CHANNELS} and "
                              f"{MIN_SIDE} <= H, W <= {MAX_SIDE}, e.g. 3 64 64; got {size}")


def check_workers(workers: Any) -> None:
    """``workers`` (data loader processes) an integer in [0, 256]."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 256:
        raise SbnSurgeryError(f"--workers must be an integer in [0, 256]; got {workers!r}")
