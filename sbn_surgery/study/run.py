"""``study(...)``: every arm x seed as one finetune run, resumable, then the report."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import SbnSurgeryError
from . import store
from ..progress import ProgressFn
from .arms import Arm, describe, parse_arms
from .setup import StudySetup, from_study_checkpoint
from .store import StudyError

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
    features: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> measures

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


def _check_from_study(source: Path, model: str, given: dict[str, Any], seeds: range) -> None:
    """``--from-study DIR``: DIR is a study of ``model`` built alike, with a trained ``none`` run
    for every seed asked for."""
    if given.get("checkpoint"):
        raise SbnSurgeryError("--from-study takes each seed's weights from that study's none "
                              "runs; leave out --checkpoint")
    old = store.read_study(source)["options"]
    if old.get("model") != model:
        raise StudyError(f"--from-study {source} trained {old.get('model')!r}, not {model!r}; "
                         f"give the model name {old.get('model')}")
    if (old.get("model_kwargs") or {}) != (given.get("model_kwargs") or {}):
        raise StudyError(f"--from-study {source} built its models with --model-kwargs "
                         f"{old.get('model_kwargs') or {}}, this study with "
                         f"{given.get('model_kwargs') or {}}; give the same --model-kwargs")
    missing = [k for k in seeds if not from_study_checkpoint(source, k).is_file()]
    if missing:
        first = int(old.get("seed") or 0)
        raise StudyError(f"--from-study {source}: no {from_study_checkpoint(source, missing[0])} "
                         f"(seed {missing[0]}); that study has seeds {first}.."
                         f"{first + int(old.get('seeds') or 0) - 1} and must have finished "
                         "them: choose --seed/--seeds among them, or finish that study first")


def _run_one(setup: StudySetup, arm: Arm, seed: int, out: Path, given: dict[str, Any],
             main: bool, progress: Optional[ProgressFn]) -> RunRecord:
    """The run of ``arm`` with ``seed``: read when finished, resumed when begun, else trained;
    measured at initialization and after every epoch (see :mod:`.features`)."""
    from ..train import finetune

    run_dir = out / arm.dir / f"seed{seed}"
    record = RunRecord(arm.spec, seed, str(run_dir), store.read_history(run_dir))
    measuring = setup.reference is not None
    record.features = store.read_features(run_dir) if measuring and main else {}
    if len(record.history) >= given["epochs"]:
        if main:
            store.tidy_run(run_dir)
        return record
    net = setup.build(arm, seed)
    if main and store.read_growth(out / arm.dir) is None:
        store.write_json(out / arm.dir / store.INIT_FILE,
                         {"rms_growth": setup.growth(net), "seed": seed})
    resume = (run_dir / "state.pt").is_file() and (run_dir / "last.safetensors").is_file()
    rows = record.features if resume else {}  # a resumed run repeats (and rewrites) its epochs
    prefix = f"{arm.spec} seed{seed}"

    def cb(desc: str, done: int, total: Optional[int], info: str = "") -> None:
        if progress is not None:
            progress(f"{prefix} {desc}", done, total, info=info)

    def on_epoch(model, epoch: int) -> None:  # on every rank (synchronized norms need all)
        rows[epoch] = setup.measure(model, epoch)
        if main:
            store.write_features(run_dir, rows, setup.about())

    if measuring and main and 0 not in rows:
        on_epoch(net, 0)  # before any state is loaded: the model at initialization
    kwargs = {k: given.get(k) for k in RUN_OPTIONS if k not in BUILD_OPTIONS}
    kwargs.update({k: given[k] for k in EXEC_OPTIONS if k in given})
    kwargs["seed"] = seed
    result = finetune(net, setup.data, output=run_dir, resume=resume, overwrite=not resume,
                      progress=cb, on_epoch=on_epoch if measuring else None, **kwargs)
    record.history, record.trained = list(result.history), True
    record.features = rows if main else {}  # the other ranks' lack epoch 0; rank 0 reports
    if main:
        store.tidy_run(run_dir)
    return record


def study(model: str, data: Union[str, Path], *, arms: Optional[Sequence[str]] = None,
          seeds: int = 3, seed: int = 0, output: Union[str, Path] = "runs/study",
          from_study: Union[str, Path, None] = None,
          progress: Optional[ProgressFn] = None, **options: Any):
    """Fine-tune ``model`` on ``data`` once per arm and seed and compare every arm with ``none``.

    ``arms``: specs such as ``none``, ``resnet``, ``resnet:frequency``, ``my.yaml``,
    ``resnet+remove-bn`` (default: none and the model family's shipped recipe). ``seeds``: runs
    per arm, with seeds ``seed .. seed+seeds-1``; within a seed the arms share initial weights,
    data order and augmentation. ``options``: finetune's (epochs, batch_size, lr, ...). The runs
    go to ``output/<arm dir>/seed<k>/``; a second call with the same arguments reuses finished
    runs, resumes an interrupted one, and only reports when all are done. Every run's feature
    maps at the SBN sites are measured at initialization and after every epoch (see
    :mod:`sbn_surgery.study.features`). ``from_study``: the directory of an earlier study of
    ``model``; seed k's arms then all start from its ``none/seed<k>/best.safetensors`` (SBN arms
    converted with the recipe's init, ``auto``: identity), the tool's own workflow. Returns a
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
    source = Path(from_study) if from_study is not None else None
    if source is not None:
        _check_from_study(source, model, options, range(seed, seed + seeds))
    out = Path(output)
    stored = _options(model, str(data), parsed, seeds, seed, options)
    stored["from_study"] = None if source is None else str(source)
    ctx = D.setup(options.get("device"))  # under torchrun: one process group for every run
    held = contextlib.ExitStack()
    try:
        if ctx.is_main:
            held.enter_context(run_lock(out, "study"))  # one study at a time in --output
            if not store.check_output(out, stored):
                store.save_options(out, stored)
        else:
            progress = None
        given = {**stored, **{k: options[k] for k in EXEC_OPTIONS if k in options}}
        # where arms without SBN are measured: the sites of the first arm that has SBN
        reference = next((a.recipe for a in parsed if a.recipe is not None and a.base != "none"),
                         None)
        setup = StudySetup(model, str(data), given, reference, source)
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
        return summarize(out, stored, parsed, records, growth, write=ctx.is_main)
    finally:
        held.close()
        ctx.close()


def _growth(setup: StudySetup, arm: Arm, out: Path, seed: int, main: bool) -> Optional[float]:
    stored = store.read_growth(out / arm.dir)
    if stored is not None:
        value = stored["rms_growth"]
        return float(value) if isinstance(value, (int, float)) else None
    if not main:
        return None
    value = setup.growth(setup.build(arm, seed))  # a study whose init.json went missing
    store.write_json(out / arm.dir / store.INIT_FILE, {"rms_growth": value, "seed": seed})
    return value
