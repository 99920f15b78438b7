"""timm models by name, with the user's own weights (never a download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import CheckpointError, ModelError, near_names

__all__ = ["create_model", "input_size_of", "read_state_dict", "load_weights", "resolve_model_name"]


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


def create_model(
    name: str,
    *,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    checkpoint: Optional[str | Path] = None,
) -> nn.Module:
    """A timm model, ``pretrained=False``, optionally loaded from the user's checkpoint file.

    When ``num_classes`` differs from the checkpoint's head, the head's weights are left at their
    initialization and every other key must fit.
    """
    import timm

    resolve_model_name(name)
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ModelError(
            f"timm model {name!r} does not take these arguments {kwargs}: {exc}. "
            "Check --model-kwargs / --num-classes."
        ) from None
    if checkpoint is not None:
        load_weights(model, read_state_dict(checkpoint), source=str(checkpoint),
                     skip_head=num_classes is not None)
    return model


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for, from timm's pretrained_cfg (3x224x224 if unknown)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return tuple(int(v) for v in size)  # type: ignore[return-value]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .pth/.pt/.bin file with ``weights_only=True``.

    Common wrappers (``state_dict``, ``model``, ``state_dict_ema``) and DDP's ``module.`` prefix are
    unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Give a .safetensors file, or a .pth/.pt file saved with torch.save(model.state_dict())."
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _summary(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                 skip_head: bool = False) -> None:
    """Load ``state`` strictly; a mismatch is a CheckpointError that summarizes the keys.
    ``skip_head``: classifier keys may be missing or of another shape (a reset head)."""
    own = model.state_dict()
    head = tuple(_head_prefixes(model)) if skip_head else ()
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


def _head_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or []
    if isinstance(heads, str):
        heads = [heads]
    return [h + "." for h in heads]
