"""Fine-tuning converted models: ``finetune(...)`` (one process, or DDP under torchrun).

Parts, by what each owns:

* ``options``: the run's options, defaults, and how ``--resume`` reuses them.
* ``model``: model building (convert or load), head reset, trainable parameters, optimizer, LR.
* ``distributed``: device choice, process group, SyncBatchNorm, agreeing running statistics.
* ``outputs``: checkpoints, ``state.pt``, ``metrics.jsonl``, ``curves.png`` (atomic writes).
* ``loop``: epochs, validation, resume and Ctrl-C.
"""

from .loop import FinetuneResult, TrainingInterrupted, finetune

__all__ = ["finetune", "FinetuneResult", "TrainingInterrupted"]
