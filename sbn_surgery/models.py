"""timm models by name, with weights only where the user asked for them: their own file
(``checkpoint``), or timm's pretrained weights by name (``pretrained``, or ``checkpoint`` =
``hf-hub:ORG/NAME``) from the Hugging Face cache, downloaded only when allowed (:mod:`.hub`).

Hub weights are read as every weights file is (:mod:`.weights`: safetensors preferred, pickles
only with ``weights_only=True``) and handed to timm's own loading (``create_model(name,
pretrained=True, pretrained_cfg_overlay=...)``), which adapts the input channels, drops a head
of another size and applies the model's checkpoint filter. The weights' preprocessing (a tag's
``pretrained_cfg``, a snapshot's ``config.json``) becomes the model's ``pretrained_cfg``, so
what is built downstream from the model uses it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import CheckpointError, ModelError, near_names
from .hub import WEIGHT_FILES, fetch_repo, fetch_url, is_hub_id, parse_hub_id
from .pretrained_cfg import check_cfg, subset
from .setup_report import HeadReset, SetupReport
from .weights import Weights, read_config, read_weights

__all__ = ["create_model", "input_size_of", "read_state_dict", "load_weights", "resolve_model_name",
           "check_model_kwargs", "pretrained_cfg_of", "random_weights_notice", "imagenet_labels"]

#: create_model arguments that make timm read a file or the network: weights come only from
#: ``checkpoint`` or ``pretrained``, so these are refused wherever they come from (the command
#: line, metadata).
FORBIDDEN_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                    "checkpoint_path", "cache_dir")
_FORBIDDEN_PARTS = ("pretrained", "checkpoint", "hf_hub", "cache")
_FORBIDDEN_ENDS = ("_path", "_file", "_url", "_dir")


def resolve_model_name(name: str) -> str:
    import timm

    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        _pretrained_cfg(name)  # an unknown tag is refused here, naming the known ones
        return name
    hint = near_names(name, timm.list_models())
    raise ModelError(
        f"unknown timm model {name!r}"
        + (f"; did you mean {', '.join(hint)}?" if hint else "")
        + " List them with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
    )


def _pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (None if its architecture has none); an unknown
    tag is a ModelError naming the architecture's tags."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        arch, _, tag = name.partition(".")
        tags = timm.list_pretrained(arch + ".*")
        raise ModelError(f"timm model {arch} has no pretrained tag {tag!r}; its tags: "
                         f"{', '.join(tags[:8])}{' ...' if len(tags) > 8 else ''}") from None


#: What a create_model argument is called: a Python name, short enough to be quoted back in a
#: message (as ``yamlfile.key_text`` quotes option names).
ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


def check_model_kwargs(kwargs: dict[str, Any], source: str = "--model-kwargs") -> None:
    """Refuse create_model arguments that are not Python names (counted, not repeated: they may
    come from any file, e.g. a --config file's model_kwargs, and the line may reach a log), and
    those that would make timm read another file or the network."""
    odd = [k for k in kwargs if not (isinstance(k, str) and ARG_NAME.fullmatch(k))]
    if odd:
        raise ModelError(f"{source}: {len(odd)} argument name(s) that are not Python names; a "
                         "timm create_model argument is a name, e.g. drop_rate=0.1")
    for key in kwargs:
        low = str(key).lower()
        if (key in FORBIDDEN_KWARGS or any(part in low for part in _FORBIDDEN_PARTS)
                or low.endswith(_FORBIDDEN_ENDS)):
            raise ModelError(
                f"{source}: model argument {key!r} is refused: it could make timm read a file or "
                "download; weights come only from --checkpoint or --pretrained")


def _fit_snapshot(name: str, weights: Weights, num_classes: Optional[int]) -> Optional[int]:
    """Check a snapshot's config.json against ``name``; its class count when none was given."""
    arch = weights.architecture
    if arch is not None and arch.split(".", 1)[0] != name.split(".", 1)[0]:
        raise ModelError(f"checkpoint {weights.source} is a {arch} (its config.json says so), not "
                         f"{name}; give the model name {arch.split('.', 1)[0]}")
    return num_classes if num_classes is not None else weights.num_classes


def _timm_pretrained(name: str, what: str, download: bool, with_weights: bool) -> Weights:
    """timm's pretrained weights for ``name`` (its tag, else timm's default tag)."""
    import timm

    cfg = _pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = timm.list_pretrained(name.split(".", 1)[0] + ".*")[:6]
        raise ModelError(f"--pretrained: timm has no pretrained weights for {name}"
                         + (f"; it has {', '.join(tags)}" if tags else
                            "; leave --pretrained out (random init) or give --checkpoint FILE"))
    if not with_weights:
        return Weights({}, what)
    if cfg.hf_hub_id:
        repo, _, rev = cfg.hf_hub_id.partition("@")
        files = WEIGHT_FILES
        if cfg.hf_hub_filename:  # safetensors first, as timm looks for it
            alt = cfg.hf_hub_filename.rsplit(".", 1)[0] + ".safetensors"
            files = tuple(dict.fromkeys((alt, cfg.hf_hub_filename)))
        path = fetch_repo(repo, rev or None, what=what, files=files, download=download).weights
    else:
        path = fetch_url(cfg.url, what=what, download=download)
    return Weights(read_weights(path).state, f"{what} ({path})")


def _hub_checkpoint(spec: str, download: bool, with_weights: bool) -> Weights:
    """``hf-hub:ORG/NAME[@REV]``: its weights and what its config.json says."""
    repo, rev = parse_hub_id(spec)
    files = fetch_repo(repo, rev, what=spec, config=True, download=download)
    info = read_config(files.config.parent) if files.config is not None else {}
    state = read_weights(files.weights).state if with_weights else {}
    return Weights(state, f"{spec} ({files.weights})", info.get("architecture"),
                   info.get("num_classes"), info.get("pretrained_cfg") or {})


def _local(checkpoint: str | Path, key: Optional[str], with_weights: bool) -> Weights:
    if with_weights:
        return read_weights(checkpoint, key)
    path = Path(checkpoint)
    info = read_config(path) if path.is_dir() else {}
    return Weights({}, str(path), info.get("architecture"), info.get("num_classes"),
                   info.get("pretrained_cfg") or {})


def _overlay(weights: Optional[Weights]) -> dict[str, Any]:
    """The weights' preprocessing for timm's pretrained_cfg (tuples, as timm keeps them)."""
    cfg = dict(weights.pretrained_cfg) if weights is not None else {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def create_model(
    name: str,
    *,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    checkpoint: Optional[str | Path] = None,
    checkpoint_key: Optional[str] = None,
    pretrained: bool = False,
    download: bool = True,
    with_weights: bool = True,
    report: Optional[SetupReport] = None,
) -> nn.Module:
    """A timm model, with weights from one place at most:

    * ``checkpoint``: the user's file, a timm training checkpoint (``checkpoint_key`` choosing
      e.g. ``state_dict_ema``), a snapshot directory (its config.json class count is used when
      ``num_classes`` is None), or ``hf-hub:ORG/NAME[@REV]`` (a Hub repository: the same, through
      the Hugging Face cache);
    * ``pretrained``: timm's weights for the name's tag (``resnet50.a1_in1k``; without a tag,
      timm's default one), through the Hugging Face cache.

    Hub weights are downloaded only with ``download`` (else the cache must hold them) and never
    with HF_HUB_OFFLINE set. ``with_weights=False`` builds the model the weights need, with
    their preprocessing as ``pretrained_cfg``, without reading (or downloading) the tensors
    (a snapshot's config.json is still read, and a Hub repository's fetched).

    When ``num_classes`` differs from the checkpoint's head, the head's weights are left at their
    initialization (``report.head`` says so) and every other key must fit (Hub weights: timm
    drops the head and loads the rest; a key the model has and the weights lack is still an
    error).
    """
    resolve_model_name(name)
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(kwargs)
    if checkpoint_key is not None and (checkpoint is None or is_hub_id(checkpoint)):
        raise CheckpointError("--checkpoint-key names a key inside a --checkpoint file; give "
                              "--checkpoint FILE, or leave --checkpoint-key out")
    if pretrained and checkpoint is not None:
        raise CheckpointError("--pretrained and --checkpoint both give the weights; give one: "
                              "--pretrained for timm's weights of the tag, --checkpoint for a "
                              "file, folder or hf-hub:ORG/NAME")
    via_timm = pretrained or is_hub_id(checkpoint)
    weights = None
    if pretrained:
        weights = _timm_pretrained(name, name, download, with_weights)
    elif is_hub_id(checkpoint):
        weights = _hub_checkpoint(str(checkpoint), download, with_weights)
    elif checkpoint is not None:
        weights = _local(checkpoint, checkpoint_key, with_weights)
    head_given = num_classes is not None
    if weights is not None:
        num_classes = _fit_snapshot(name, weights, num_classes)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if via_timm and with_weights:
        model = _build_pretrained(name, kwargs, weights)
        before = weights.num_classes
        if report is not None and head_given and before is not None and before != num_classes:
            report.head = HeadReset(before, int(num_classes), "checkpoint")
        return model
    model = _build(name, kwargs, _overlay(weights))
    if weights is not None and with_weights:
        reset = load_weights(model, weights.state, source=weights.source, skip_head=head_given)
        if report is not None and reset is not None:
            report.head = reset
    return model


def _build(name: str, kwargs: dict[str, Any], overlay: dict[str, Any],
           pretrained: bool = False) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None,
                                 **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        # arguments timm refuses (an unknown name, or a value its own asserts reject)
        raise ModelError(
            f"timm model {name!r} does not take these arguments ({', '.join(kwargs)}): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
            "Check --model-kwargs / --num-classes."
        ) from None


def _build_pretrained(name: str, kwargs: dict[str, Any], weights: Weights) -> nn.Module:
    """timm's own loading of ``weights.state`` (input-channel adaptation, a head of another
    size dropped, the model's checkpoint filter), into the model the weights' config needs."""
    overlay = _overlay(weights)
    if weights.num_classes is not None:  # the head in the file, whatever the model's
        overlay["num_classes"] = weights.num_classes
    overlay["state_dict"] = weights.state
    try:
        model = _build(name, kwargs, overlay, pretrained=True)
    except (RuntimeError, ModelError) as exc:
        problems = ""
        try:
            with torch.device("meta"):  # the model alone: arguments timm refuses are the user's
                probe = _build(name, kwargs, _overlay(weights))
            problems = describe_mismatch(probe, weights.state, skip_head=True)
        except ModelError:
            raise
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta: timm's words
            pass
        detail = problems or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"the weights of {weights.source} do not fit model {name}: "
                              f"{detail}. Check the model name, --model-kwargs and "
                              "--num-classes") from None
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps its overlay: not the tensors
    _check_complete(model, weights, name)
    return model


def _check_complete(model: nn.Module, weights: Weights, name: str) -> None:
    """timm loads non-strictly when it drops a head of another size: a layer the weights lack
    would stay random without a word. Where the weights' keys are the model's (no checkpoint
    filter renamed them), every key outside the head must be in them."""
    own = model.state_dict()
    if any(k not in own for k in weights.state):
        return  # renamed by the model's checkpoint filter: timm's own check applies
    head = tuple(_head_prefixes(model)) or ("\0",)
    missing = [k for k in own if k not in weights.state and not k.startswith(head)]
    if missing:
        raise CheckpointError(f"the weights of {weights.source} do not fit model {name}: "
                              f"{len(missing)} missing key(s): {_summary(missing)}. Check the "
                              "model name and --model-kwargs")


def pretrained_cfg_of(model: nn.Module, *, labels: bool = True,
                      imagenet: bool = False) -> dict[str, Any]:
    """The weights' preprocessing (:mod:`.pretrained_cfg`'s keys) of a timm model, validated;
    with ``labels``, the class names its config gives (``label_names``), or with ``imagenet``
    (timm's own weights for a tag) ImageNet's for an ImageNet head, only while the head is the
    weights' own."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    kept = subset(cfg)
    head = getattr(model, "num_classes", None)
    if not labels or head is None or head != kept.get("num_classes"):
        kept.pop("label_names", None)
    elif "label_names" not in kept and imagenet:
        labels = imagenet_labels(model)
        if labels is not None and len(labels[0]) == head:
            kept["label_names"] = labels[0]
    return check_cfg(kept, drop_bad_labels=True)  # e.g. more class names than metadata holds


def imagenet_labels(model: nn.Module) -> Optional[tuple[list[str], list[str]]]:
    """(names, descriptions) of timm's label set for a model whose class count is one of its
    ImageNet sets (``timm.data.infer_imagenet_subset``): WordNet ids and readable names; None
    for any other head, or a label set timm lists but cannot read."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset_name = infer_imagenet_subset(model)
        if not subset_name:
            return None
        info = ImageNetInfo(subset_name)
        return list(info.label_names()), list(info.label_descriptions())
    except Exception:  # noqa: BLE001 - timm's label files: the indices serve instead
        return None


def random_weights_notice(name: str, *, pretrained: bool = False,
                          checkpoint: Optional[object] = None) -> Optional[str]:
    """One line for a name whose tag names pretrained weights when none are loaded; None
    otherwise (no tag, weights given, or a tag without weights)."""
    if pretrained or checkpoint is not None or "." not in str(name):
        return None
    try:
        cfg = _pretrained_cfg(str(name))
    except ModelError:  # an unknown tag: the command says so itself
        return None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return None
    tag = str(name).split(".", 1)[1]
    return (f"{name}: the weights are random (timm's initialization); the tag {tag} names "
            "pretrained weights, loaded only with --pretrained (downloaded once into the "
            "Hugging Face cache), or give your own with --checkpoint FILE")


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for, from timm's pretrained_cfg (3x224x224 if unknown)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return tuple(int(v) for v in size)  # type: ignore[return-value]


def read_state_dict(path: str | Path, key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a .pth/.pt/.bin file read with ``weights_only=True``
    (timm training checkpoints included; ``key`` picks e.g. ``state_dict_ema``), or a snapshot
    directory; ``module.``/``_orig_mod.`` prefixes removed (see :mod:`sbn_surgery.weights`)."""
    return read_weights(path, key).state


def _summary(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                 skip_head: bool = False) -> Optional[HeadReset]:
    """Load ``state`` strictly; a mismatch is a CheckpointError that summarizes the keys.
    ``skip_head``: classifier keys may be missing or of another shape (a reset head); returns
    what was left out of the head, if anything."""
    own = model.state_dict()
    head = tuple(_head_prefixes(model)) if skip_head else ()
    left_out = [v for k, v in state.items()
                if head and k.startswith(head) and k in own and own[k].shape != v.shape]
    if head:
        state = {k: v for k, v in state.items()
                 if not (k.startswith(head) and k in own and own[k].shape != v.shape)}
    problems = describe_mismatch(model, state, skip_head=skip_head)
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit model {type(model).__name__}: {problems}. "
            "Check the model name, --model-kwargs and --num-classes match the checkpoint."
        )
    try:
        model.load_state_dict(state, strict=False)
    except ValueError as e:  # a layer refused its values (e.g. non-finite SBN statistics)
        raise CheckpointError(f"checkpoint {source}: {e}") from None
    if head and (left_out or any(k.startswith(head) and k not in state for k in own)):
        before = left_out[0].shape[0] if left_out and left_out[0].dim() else None
        return HeadReset(before, int(getattr(model, "num_classes", 0) or 0), "checkpoint")
    return None


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor],
                      skip_head: bool = False) -> str:
    """Missing and unexpected keys and shape mismatches of ``state`` against ``model``, in a
    few words ('' when it fits); ``skip_head``: the classifier may differ."""
    own = model.state_dict()
    head = tuple(_head_prefixes(model)) if skip_head else ()
    in_head = (lambda k: bool(head) and k.startswith(head))  # noqa: E731
    missing = [k for k in own if k not in state and not in_head(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and own[k].shape != state[k].shape and not in_head(k)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_summary(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_summary(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_summary(shapes, 2)}")
    return "; ".join(parts)


def _head_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or []
    if isinstance(heads, str):
        heads = [heads]
    return [h + "." for h in heads]
