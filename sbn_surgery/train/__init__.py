"""Fine-tuning converted models: ``finetune(...)`` (one process, or DDP under torchrun).

Parts, by what each owns:

* ``options``: the run's options (one pydantic model: CLI flags, keywords, ``--config`` and
  ``args.yaml`` all come from it), defaults, and how ``--resume`` reuses them.
* ``model``: model building (convert or load), head reset, trainable parameters.
* ``optim``: timm's optimizer, scheduler, mixup, loss, EMA and gradient clipping for a run.
* ``distributed``: device choice, process group, SyncBatchNorm, agreeing running statistics.
* ``outputs``: checkpoints, ``state.pt``, ``args.yaml``, ``metrics.jsonl``, ``summary.csv``,
  ``curves.png`` (atomic writes).
* ``setup``: ``finetune`` itself: options resolved, model, data and optimizer built.
* ``loop``: epochs, validation, resume and Ctrl-C.

The package imports its parts on first use (PEP 562), so ``options`` (which the CLI reads to
make its flags) imports neither torch nor timm.
"""

from __future__ import annotations

import importlib

_LAZY = {"finetune": ".setup", "FinetuneResult": ".loop", "TrainingInterrupted": ".loop"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
