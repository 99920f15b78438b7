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
"""

from .loop import FinetuneResult, TrainingInterrupted
from .setup import finetune

__all__ = ["finetune", "FinetuneResult", "TrainingInterrupted"]
