"""``study(...)``: every arm x seed as one finetune run, resumable, then the report."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import SbnSurgeryError
from . import store
from ..progress import ProgressFn
from .arms import Arm, build_arm_model, describe, parse_arms

from ..train.options import ALIASES, EXEC_KEYS, RUN_KEYS, canonical

#: Options that define the runs (finetune's, less what the study sets per arm and seed): a
#: second invocation on the same --output must repeat them.
RUN_OPTIONS = tuple(k for k in RUN_KEYS
                    if k not in ("model", "data", "recipe", "seed", "checkpoint_key"))
#: Options that change how the runs execute, not what they compute; free to change.
EXEC_OPTIONS = EXEC_KEYS
#: What each arm's model is built with (the rest goes to finetune).
#: (--drop/--drop-path are built in too, and still passed on, so finetune records them.)
BUILD_OPTIONS = ("checkpoint", "pretrained", "model_kwargs", "force")


@dataclass
class RunRecord:
    """One finetune run of the study; ``history`` is its ``metrics.jsonl``."""

    arm: str
    seed: int
    dir: str
    history: list[dict[str, Any]] = field(default_factory=list)
    trained: bool = False  # whether this invocation trained (or resumed) it

    @property
    def val_top1(self) -> float:
        return float(self.history[-1]["top1"])

    @property
    def val_loss(self) -> float:
        return float(self.history[-1]["val_loss"])

    @property
    def images_per_s(self) -> float:
        secs = sum(float(r.get("train_time_s", 0.0)) for r in self.history)
        return sum(float(r.get("images", 0)) for r in self.history) / secs if secs else 0.0


def _options(model: str, data: str, arms: list[Arm], seeds: int, seed: int,
             given: dict[str, Any]) -> dict[str, Any]:
    """What study.json stores: defaults filled in, so leaving an option out equals giving its
    default."""
    from ..train.options import DEFAULTS

    opts: dict[str, Any] = {"model": model, "data": str(data), "seeds": seeds, "seed": seed,
                            "arms": [describe(a) for a in arms]}
    for key in RUN_OPTIONS:
        value = given.get(key)
        if value is None:
            value = DEFAULTS.get(key)
        opts[key] = list(value) if isinstance(value, tuple) else value
    return opts


def _check(model: str, arms: list[Arm], seeds: int, given: dict[str, Any]) -> None:
    from ..train.model import is_checkpoint_path

    if seeds < 2:
        raise SbnSurgeryError(f"--seeds {seeds}: a 95 % interval over seeds needs at least 2 "
                              "seeds; give --seeds 2 or more (3 or more to resolve small gains)")
    if is_checkpoint_path(model):
        raise SbnSurgeryError(f"study needs a timm model name, not the converted checkpoint "
                              f"{model}: every arm inserts its own SBN; give the name, and the "
                              f"original weights with --checkpoint")
    if given.get("train") == "sbn" and any(a.recipe is None for a in arms):
        raise SbnSurgeryError("--train sbn trains SBN layers only, and arm 'none' has none; use "
                              "--train all or --train norm")
    if given.get("sync_stats") and any(a.remove_bn for a in arms):
        raise SbnSurgeryError("--sync-stats turns BatchNorm into SyncBatchNorm, which would bring "
                              "back the BatchNorm a +remove-bn arm removed; leave out one of them")


class _Setup:
    """Data, input size and calibration images: found once, and only if a model is built."""

    def __init__(self, model: str, data: str, given: dict[str, Any]) -> None:
        self.model, self.data, self.given = model, data, given
        self._ready: Optional[tuple] = None

    def get(self) -> tuple[int, tuple[int, int, int], list]:
        if self._ready is None:
            from ..data import calibration_batches, data_config_for, default_input_size, open_source
            from ..models import create_model, input_size_of
            from ..train.model import CALIBRATION_BATCHES
            from ..train.options import DEFAULTS

            g = self.given
            ds = open_source(self.data, **{k: g.get(k) for k in ("dataset", "train_split",
                                                                 "val_split")})
            in_chans = int((g.get("model_kwargs") or {}).get("in_chans", 3))
            n_cls = g.get("num_classes") or ds.num_classes
            probe = create_model(self.model, num_classes=n_cls, model_kwargs=self.kwargs(),
                                 checkpoint=g.get("checkpoint"),
                                 pretrained=bool(g.get("pretrained")), with_weights=False)
            size = (tuple(int(v) for v in g["input_size"]) if g.get("input_size") else
                    default_input_size(ds, input_size_of(probe), in_chans))
            cfg = data_config_for(probe, size, in_chans, g)  # timm's --mean, --std, ... if given
            batch = min(g.get("batch_size") or DEFAULTS["batch_size"], 32)
            calib = calibration_batches(ds, cfg, batch, CALIBRATION_BATCHES)
            self._ready = (n_cls, size, calib)
        return self._ready

    def kwargs(self) -> dict[str, Any]:
        """timm create_model arguments: --model-kwargs plus --drop/--drop-path."""
        from ..train.model import model_kwargs_of

        g = self.given
        return model_kwargs_of(g.get("model_kwargs"), g.get("drop"), g.get("drop_path"))

    def build(self, arm: Arm, seed: int):
        n_cls, size, calib = self.get()
        g = self.given
        return build_arm_model(arm, self.model, seed=seed, num_classes=n_cls,
                               checkpoint=g.get("checkpoint"),
                               pretrained=bool(g.get("pretrained")), model_kwargs=self.kwargs(),
                               input_size=size, calibration=calib, force=bool(g.get("force")))

    def growth(self, net) -> Optional[float]:
        from ..diagnose import diagnose

        return diagnose(net, self.get()[2]).growth()


def _run_one(setup: _Setup, arm: Arm, seed: int, out: Path, given: dict[str, Any],
             main: bool, progress: Optional[ProgressFn]) -> RunRecord:
    """The run of ``arm`` with ``seed``: read when finished, resumed when begun, else trained."""
    from ..train import finetune

    run_dir = out / arm.dir / f"seed{seed}"
    record = RunRecord(arm.spec, seed, str(run_dir), store.read_history(run_dir))
    if len(record.history) >= given["epochs"]:
        return record
    net = setup.build(arm, seed)
    if main and store.read_growth(out / arm.dir) is None:
        store.write_json(out / arm.dir / store.INIT_FILE,
                         {"rms_growth": setup.growth(net), "seed": seed})
    resume = (run_dir / "state.pt").is_file() and (run_dir / "last.safetensors").is_file()
    prefix = f"{arm.spec} seed{seed}"

    def cb(desc: str, done: int, total: Optional[int], info: str = "") -> None:
        if progress is not None:
            progress(f"{prefix} {desc}", done, total, info=info)

    kwargs = {k: given.get(k) for k in RUN_OPTIONS if k not in BUILD_OPTIONS}
    kwargs.update({k: given[k] for k in EXEC_OPTIONS if k in given})
    kwargs["seed"] = seed
    result = finetune(net, setup.data, output=run_dir, resume=resume, overwrite=not resume,
                      progress=cb, **kwargs)
    record.history, record.trained = list(result.history), True
    return record


def study(model: str, data: Union[str, Path], *, arms: Optional[Sequence[str]] = None,
          seeds: int = 3, seed: int = 0, output: Union[str, Path] = "runs/study",
          progress: Optional[ProgressFn] = None, **options: Any):
    """Fine-tune ``model`` on ``data`` once per arm and seed and compare every arm with ``none``.

    ``arms``: specs such as ``none``, ``resnet``, ``resnet:frequency``, ``my.yaml``,
    ``resnet+remove-bn`` (default: none and the model family's shipped recipe). ``seeds``: runs
    per arm, with seeds ``seed .. seed+seeds-1``; within a seed the arms share initial weights,
    data order and augmentation. ``options``: finetune's (epochs, batch_size, lr, ...). The runs
    go to ``output/<arm dir>/seed<k>/``; a second call with the same arguments reuses finished
    runs, resumes an interrupted one, and only reports when all are done. Returns a
    :class:`~sbn_surgery.study.report.StudyResult`.
    """
    from ..recipe import recipe_for_model
    from ..train import distributed as D
    from ..train.outputs import run_lock
    from .report import summarize

    unknown = sorted(set(options) - set(RUN_OPTIONS) - set(EXEC_OPTIONS) - set(ALIASES))
    if unknown:
        raise TypeError(f"study() got unexpected options: {', '.join(unknown)}")
    options = canonical(options)
    parsed = parse_arms(list(arms) if arms else ["none", recipe_for_model(model)])
    _check(model, parsed, seeds, options)
    out = Path(output)
    given = _options(model, str(data), parsed, seeds, seed, options)
    ctx = D.setup(options.get("device"))  # under torchrun: one process group for every run
    held = contextlib.ExitStack()
    try:
        if ctx.is_main:
            held.enter_context(run_lock(out, "study"))  # one study at a time in --output
            if not store.check_output(out, given):
                store.save_options(out, given)
        else:
            progress = None
        given.update({k: options[k] for k in EXEC_OPTIONS if k in options})
        setup = _Setup(model, str(data), given)
        records: list[RunRecord] = []
        total = len(parsed) * seeds
        for k in range(seed, seed + seeds):
            for arm in parsed:
                if progress is not None:
                    progress("study", len(records), total, info=f"{arm.spec} seed{k}")
                records.append(_run_one(setup, arm, k, out, given, ctx.is_main, progress))
        if progress is not None:
            progress("study", total, total, info="done")
        growth = {a.dir: _growth(setup, a, out, seed, ctx.is_main) for a in parsed}
        return summarize(out, given, parsed, records, growth, write=ctx.is_main)
    finally:
        held.close()
        ctx.close()


def _growth(setup: _Setup, arm: Arm, out: Path, seed: int, main: bool) -> Optional[float]:
    stored = store.read_growth(out / arm.dir)
    if stored is not None:
        value = stored["rms_growth"]
        return float(value) if isinstance(value, (int, float)) else None
    if not main:
        return None
    value = setup.growth(setup.build(arm, seed))  # a study whose init.json went missing
    store.write_json(out / arm.dir / store.INIT_FILE, {"rms_growth": value, "seed": seed})
    return value
