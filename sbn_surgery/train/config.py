"""Options from a YAML file (``--config``): this tool's own ``args.yaml``, or timm's.

A file of this tool's options (the long flags with ``_`` for ``-``) must name only those: an
unknown key is refused, since it is most likely a typo. A file written by timm's ``train.py``
(its ``args.yaml``, or a ``--config`` file for it) is read as timm would read it. Its options
that have an equivalent here are taken, under their name here where it differs: ``data_dir`` is
``data``, ``initial_checkpoint`` is ``checkpoint``, ``sync_bn`` is ``sync_stats``, ``img_size``
and ``in_chans`` make ``input_size``, ``torchcompile`` turns on ``compile``, and ``lr_base``,
``lr_base_size`` and ``lr_base_scale`` give the lr by timm's rule. Its data flags (``mean``,
``std``, ``interpolation``, ``crop_pct``, ``scale``, ``ratio``, ``hflip``, ``vflip``,
``color_jitter``, ``train_interpolation``) are taken under their own names (timm's ``''``
interpolation: the model's). ``pretrained: true`` is taken too, but a file never starts a
download: the weights must be in the Hugging Face cache (or ``--pretrained`` given on the
command line). Its other options are
ignored: those that would change the trained weights and hold a value other than the one a run
here behaves as (timm's default, mostly) are named in one notice line, so nothing of the recipe
is dropped unseen; unknown keys are named too, since timm's own reader ignores them. A file is
timm's when it names an option that only timm's ``train.py`` has.

The timm names and defaults below are those of timm 1.0's ``train.py``. One difference holds at
timm's defaults: the device comes from ``--device`` (auto), not the file. ``amp: true`` is
taken as this tool's default (bfloat16 autocast with CUDA, none on CPU, where it is slow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from ..errors import SbnSurgeryError
from ..yamlfile import YamlRules, key_lines, key_text, read_yaml_file
from .options import ALIASES, FIELDS, canonical, validate

MAX_BYTES = 1 << 20
#: How a --config file is read: the bounded reader recipes use (regular files only, no blocking
#: read, a size cap, nesting and alias limits). An options file is flat; every value takes two
#: bytes or more, so only aliases can take one past the node limit (a long list, e.g. --mean
#: with 100000 values, is left to the option's own check, which names it).
RULES = YamlRules(label="--config", noun="an options file", error=SbnSurgeryError,
                  shape_hint="an options file maps option names to values. Flatten it.",
                  max_bytes=MAX_BYTES, max_depth=16, max_nodes=MAX_BYTES // 2 + 1)

#: timm options that only say how or where timm ran, or what it logged: nothing of the weights.
TIMM_NO_EFFECT = frozenset({
    "config", "output", "experiment", "resume", "no_resume_opt", "log_interval",
    "recovery_interval", "checkpoint_hist", "save_images", "amp_impl", "no_ddp_bb",
    "synchronize_step", "pin_mem", "no_prefetcher", "prefetcher", "distributed", "world_size",
    "rank", "local_rank", "device", "device_modules", "use_multi_epochs_loader", "log_wandb",
    "wandb_project", "wandb_tags", "wandb_resume_id", "worker_seeding", "fuser", "torchscript",
    "torchcompile_mode", "fast_norm", "grad_checkpointing", "validation_batch_size",
    "dataset_download", "dataset_trust_remote_code", "model_ema_force_cpu",
})

#: timm options with no equivalent here that change what is trained, at the value a run here
#: behaves as: timm's default, except ``amp_dtype`` (AMP here is bfloat16; timm's default is
#: float16, which matters only with ``amp``). Another value is named in the notice.
TIMM_DEFAULTS: dict[str, Any] = {
    # model
    "gp": None, "bn_momentum": None, "bn_eps": None, "drop_block": None,
    "drop_connect": None, "head_init_scale": None, "head_init_bias": None, "class_map": "",
    "model_dtype": None,
    # optimizer and schedule
    "layer_decay": None, "opt_kwargs": {}, "lr_noise": None, "lr_noise_pct": 0.67,
    "lr_noise_std": 1.0, "lr_cycle_mul": 1.0, "lr_cycle_decay": 0.5, "lr_cycle_limit": 1,
    "lr_k_decay": 1.0, "warmup_prefix": False, "epoch_repeats": 0.0, "start_epoch": None,
    # data, augmentation and loss
    "no_aug": False, "aug_repeats": 0, "aug_splits": 0, "jsd_loss": False,
    "bce_loss": False, "bce_target_thresh": None, "bce_sum": False, "bce_pos_weight": None,
    "remode": "pixel", "recount": 1, "resplit": False, "cutmix_minmax": None,
    "mixup_off_epoch": 0, "split_bn": False,
    "train_num_samples": None, "val_num_samples": None, "input_img_mode": None,
    "input_key": None, "target_key": None,
    # evaluation and precision
    "dist_bn": "reduce", "eval_metric": "top1", "tta": 0, "amp_dtype": "bfloat16",
}

#: timm options taken here under another name, or made into another option here.
TIMM_MAPPED = frozenset({"data_dir", "initial_checkpoint", "sync_bn", "img_size", "in_chans",
                         "torchcompile"})

TIMM_NAMES = TIMM_NO_EFFECT | TIMM_DEFAULTS.keys() | TIMM_MAPPED
#: The names that make a file timm's: those this tool does not have (``device`` is both's).
TIMM_ONLY = TIMM_NAMES - FIELDS.keys() - ALIASES.keys()


def load_config(path: Union[str, Path]) -> tuple[dict[str, Any], list[str]]:
    """The options in a YAML file, validated, and the notice lines reading it gave (a timm
    file's ignored options); see the module's docstring."""
    p = Path(path)
    root, values = _load_yaml(p)
    raw = {str(k): v for k, v in values.items()}
    lines = key_lines(root)
    where = f"{p}: "
    notes: list[str] = []
    if any(k in TIMM_ONLY for k in raw):
        raw, notes = _from_timm(raw, where, lines)
    unknown = [k for k in raw if k not in FIELDS and k not in ALIASES]
    if unknown:
        raise SbnSurgeryError(f"{where}{_keys_text(unknown, lines, 'unknown option')}; the "
                              "options are the long flags of `sbn-surgery finetune --help`, "
                              "with _ for -; remove the others")
    values = canonical({k: _number(k, v) for k, v in raw.items()}, where)
    validate(values, where)
    return values, notes


def read_config(path: Union[str, Path]) -> dict[str, Any]:
    """The options in a YAML file (``--config``; e.g. a run's ``args.yaml``), validated."""
    return load_config(path)[0]


def _load_yaml(p: Path) -> tuple[Any, dict[Any, Any]]:
    """(root node, mapping) of a --config file, read by the bounded reader recipes use too."""
    try:
        _, root, values = read_yaml_file(p, RULES)
    except FileNotFoundError:
        raise SbnSurgeryError(f"--config {p} cannot be read (no such file); give a YAML file "
                              "of options, e.g. a run's args.yaml") from None
    if values is None:
        return root, {}
    if not isinstance(values, dict):
        raise SbnSurgeryError(f"--config {p} must map option names to values (e.g. `opt: "
                              f"adamw`); it holds a {type(values).__name__}")
    return root, values


def _keys_text(keys: list[str], lines: dict[str, int], what: str) -> str:
    """``keys`` as a message names them: quoted where they look like option names, else only
    counted, with their lines (a file of secrets must not come back in an error)."""
    def at(k: str) -> str:
        return f" (line {lines[k]})" if k in lines else ""

    named = [f"{key_text(k)}{at(k)}" for k in keys if key_text(k)]
    others = [k for k in keys if not key_text(k)]
    parts = [f"{what}{'s' if len(named) > 1 else ''} {', '.join(named)}"] if named else []
    if others:
        at_lines = sorted({lines[k] for k in others if k in lines})
        shown = ", ".join(map(str, at_lines[:5])) + (" ..." if len(at_lines) > 5 else "")
        parts.append(f"{len(others)} key{'s' if len(others) > 1 else ''} that "
                     f"{'are not option names' if len(others) > 1 else 'is not an option name'}"
                     + (f" (line{'s' if len(at_lines) > 1 else ''} {shown})" if at_lines else ""))
    return " and ".join(parts)


def _number(key: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as text: a float option takes it as the number."""
    field = FIELDS.get(ALIASES.get(key, key))
    if field is not None and isinstance(value, str) and "float" in str(field.annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _from_timm(raw: dict[str, Any], where: str,
               lines: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """A timm train.py file's options as this tool's, and the notice naming what is dropped."""
    out = {k: v for k, v in raw.items() if k in FIELDS or k in ALIASES}
    out.pop("device", None)  # where timm ran (e.g. cuda:0); here --device, auto by default
    if out.get("amp"):  # timm's AMP is for its GPU: here the default, on with CUDA, off on CPU
        del out["amp"]
    out["data"] = out.get("data") or raw.get("data_dir")
    out["checkpoint"] = out.get("checkpoint") or raw.get("initial_checkpoint") or None
    if out["checkpoint"] and out.get("pretrained"):  # timm loads it over the pretrained weights
        del out["pretrained"]
    if raw.get("sync_bn") and out.get("sync_stats") is None:
        out["sync_stats"] = True
    if out.get("interpolation") == "":  # timm's "the model's"
        del out["interpolation"]
    if raw.get("torchcompile") and out.get("compile") is None:
        out["compile"] = True
    if out.get("input_size") is None and raw.get("img_size"):
        size = raw["img_size"]
        out["input_size"] = [raw.get("in_chans") or 3, size, size]
    if not raw.get("dataset"):  # timm's '' is ImageFolder/tar: here, no --dataset
        out["dataset"] = None
        for key, default in (("train_split", "train"), ("val_split", "validation")):
            if out.get(key) == default:
                out[key] = None
    if raw.get("lr_base_scale") == "":  # timm's rule: sqrt for adaptive optimizers
        opt = str(out.get("opt") or out.get("optimizer") or "sgd").lower()
        out["lr_base_scale"] = "sqrt" if "ada" in opt or "lamb" in opt else "linear"
    dropped = [f"{k}={_short(v)}" for k, v in raw.items()
               if k in TIMM_DEFAULTS and not _same(v, TIMM_DEFAULTS[k])
               and not (k == "amp_dtype" and not raw.get("amp"))]
    if raw.get("in_chans") not in (None, 3) and not raw.get("img_size"):
        dropped.append(f"in_chans={_short(raw['in_chans'])}")
    unknown = [k for k in raw if k not in FIELDS and k not in ALIASES and k not in TIMM_NAMES]
    notes = []
    if dropped or unknown:
        parts = []
        if dropped:
            parts.append("ignored (no equivalent here): " + ", ".join(dropped))
        if unknown:
            parts.append("ignored: " + _keys_text(unknown, lines, "unknown key"))
        notes.append(f"{where}read as timm train.py options; " + "; ".join(parts) + ".")
    return {k: v for k, v in out.items() if v is not None}, notes


def _short(value: Any, quote: bool = True, limit: int = 60) -> str:
    """A value as the notice shows it: its repr, cut at ``limit`` characters."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _same(a: Any, b: Any) -> bool:
    """Equal, with lists compared as lists and numbers to 1e-6 (3/4 is written 0.75)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return a == b
