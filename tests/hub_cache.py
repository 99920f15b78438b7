"""A Hugging Face cache on disk, in the Hub's layout, holding weights the tests make.

``models--ORG--NAME/snapshots/REV/{model.safetensors,config.json}`` with ``refs/main`` naming
REV: what ``huggingface_hub.hf_hub_download`` finds with ``HF_HUB_CACHE`` pointing at the root,
offline or not. The weights are a random timm model with random norm statistics (so no layer is
close to the identity), seeded, so a test can rebuild the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

#: A commit hash, as the Hub names snapshots.
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_model(name: str, seed: int = 0, **kwargs: Any):
    """The model whose weights :func:`add_repo` stores: timm's ``name`` at random init, with
    random BatchNorm statistics and affine parameters, in eval mode."""
    import timm
    import torch

    from conftest import randomize_norms

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def snapshot_dir(root: Path, repo: str) -> Path:
    org, name = repo.split("/")
    return Path(root) / f"models--{org}--{name}" / "snapshots" / REVISION


def add_repo(root: Path, repo: str, model, *, config: Optional[dict] = None,
             weights: str = "model.safetensors") -> Path:
    """Store ``model``'s weights (and ``config``, as config.json, when given) in the cache at
    ``root`` as the Hub repository ``repo``; returns the snapshot folder."""
    import torch
    from safetensors.torch import save_file

    snap = snapshot_dir(root, repo)
    snap.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(snap / weights))
    else:
        torch.save(state, snap / weights)
    if config is not None:
        (snap / "config.json").write_text(json.dumps(config), encoding="utf-8")
    refs = snap.parents[1] / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(REVISION, encoding="utf-8")
    return snap


def timm_config(model, **pretrained_cfg: Any) -> dict:
    """config.json as timm's ``save_for_hf`` writes it: architecture, class count, and the
    model's pretrained_cfg (preprocessing) updated by ``pretrained_cfg``."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v)
           for k, v in model.pretrained_cfg.items()
           if k in ("tag", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                    "num_classes", "pool_size", "first_conv", "classifier")}
    cfg.update(pretrained_cfg)
    return {"architecture": model.pretrained_cfg["architecture"],
            "num_classes": model.num_classes, "num_features": model.num_features,
            "pretrained_cfg": cfg}
