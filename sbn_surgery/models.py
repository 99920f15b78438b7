"""timm models by name, with the user's own weights (never a download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import CheckpointError, ModelError, near_names
from .setup_report import HeadReset, SetupReport
from .weights import Weights, read_weights

__all__ = ["create_model", "input_size_of", "read_state_dict", "load_weights", "resolve_model_name",
           "check_model_kwargs"]

#: create_model arguments that make timm read a file or the network: weights come only from
#: ``checkpoint``, so these are refused wherever they come from (the command line, metadata).
FORBIDDEN_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                    "checkpoint_path", "cache_dir")
_FORBIDDEN_PARTS = ("pretrained", "checkpoint", "hf_hub", "cache")
_FORBIDDEN_ENDS = ("_path", "_file", "_url", "_dir")


def resolve_model_name(name: str) -> str:
    import timm

    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        return name
    hint = near_names(name, timm.list_models())
    raise ModelError(
        f"unknown timm model {name!r}"
        + (f"; did you mean {', '.join(hint)}?" if hint else "")
        + " List them with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
    )


def check_model_kwargs(kwargs: dict[str, Any], source: str = "--model-kwargs") -> None:
    """Refuse create_model arguments that would make timm read another file or the network."""
    for key in kwargs:
        low = str(key).lower()
        if (key in FORBIDDEN_KWARGS or any(part in low for part in _FORBIDDEN_PARTS)
                or low.endswith(_FORBIDDEN_ENDS)):
            raise ModelError(
                f"{source}: model argument {key!r} is refused: it could make timm read a file or "
                "download; weights are read only from the checkpoint given (--checkpoint)")


def _fit_snapshot(name: str, weights: Weights, num_classes: Optional[int]) -> Optional[int]:
    """Check a snapshot's config.json against ``name``; its class count when none was given."""
    arch = weights.architecture
    if arch is not None and arch.split(".", 1)[0] != name.split(".", 1)[0]:
        raise ModelError(f"checkpoint {weights.source} is a {arch} (its config.json says so), not "
                         f"{name}; give the model name {arch.split('.', 1)[0]}")
    return num_classes if num_classes is not None else weights.num_classes


def create_model(
    name: str,
    *,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    checkpoint: Optional[str | Path] = None,
    checkpoint_key: Optional[str] = None,
    report: Optional[SetupReport] = None,
) -> nn.Module:
    """A timm model, ``pretrained=False``, optionally loaded from the user's checkpoint (a file,
    a timm training checkpoint with ``checkpoint_key`` choosing e.g. ``state_dict_ema``, or a
    snapshot directory whose config.json class count is used when ``num_classes`` is None).

    When ``num_classes`` differs from the checkpoint's head, the head's weights are left at their
    initialization (``report.head`` says so) and every other key must fit.
    """
    import timm

    resolve_model_name(name)
    kwargs = dict(model_kwargs or {})
    check_model_kwargs(kwargs)
    if checkpoint_key is not None and checkpoint is None:
        raise CheckpointError("--checkpoint-key names a key inside --checkpoint; give --checkpoint")
    weights = read_weights(checkpoint, checkpoint_key) if checkpoint is not None else None
    head_given = num_classes is not None
    if weights is not None:
        num_classes = _fit_snapshot(name, weights, num_classes)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        # arguments timm refuses (an unknown name, or a value its own asserts reject)
        raise ModelError(
            f"timm model {name!r} does not take these arguments {kwargs}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
            "Check --model-kwargs / --num-classes."
        ) from None
    if weights is not None:
        reset = load_weights(model, weights.state, source=weights.source, skip_head=head_given)
        if report is not None and reset is not None:
            report.head = reset
    return model


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
    missing = [k for k in own if k not in state and not (head and k.startswith(head))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_summary(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_summary(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_summary(shapes, 2)}")
        raise CheckpointError(
            f"checkpoint {source} does not fit model {type(model).__name__}: " + "; ".join(parts)
            + ". Check the model name, --model-kwargs and --num-classes match the checkpoint."
        )
    try:
        model.load_state_dict(state, strict=False)
    except ValueError as e:  # a layer refused its values (e.g. non-finite SBN statistics)
        raise CheckpointError(f"checkpoint {source}: {e}") from None
    if head and (left_out or any(k.startswith(head) and k not in state for k in own)):
        before = left_out[0].shape[0] if left_out and left_out[0].dim() else None
        return HeadReset(before, int(getattr(model, "num_classes", 0) or 0), "checkpoint")
    return None


def _head_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or []
    if isinstance(heads, str):
        heads = [heads]
    return [h + "." for h in heads]
