"""Paired A/B studies: does SBN help this model on this data, and by more than seed noise?

``study(model, data, arms=["none", "resnet", "resnet:frequency"], seeds=3, epochs=...)`` runs
one ordinary ``finetune`` per arm and seed into ``output/<arm dir>/seed<k>/`` and reports, per
arm, the mean and std of the last epoch's val top-1 and loss, images/s and the train-step time
relative to ``none``, the feature-map RMS growth at initialization (diagnose), and for each arm
the paired difference in top-1 against ``none`` with a 95 % t-interval over seeds and a verdict.

Parts, by what each owns:

* ``arms``: arm specs, their directory names, the arm's model at initialization.
* ``stats``: means, the t-interval (scipy, else a table), the verdict.
* ``store``: ``study.json`` (the options; others are refused), ``init.json``, reading runs.
* ``run``: the runs in order (seed by seed, every arm), resume, progress.
* ``report``: the summary, ``report.json`` and ``study.png``.

Pairing: within a seed every arm starts from the same weights for every shared parameter (the
torch RNG is seeded right before timm builds the model; SBN is inserted afterwards), and
finetune derives data order and augmentation from the seed alone, so every arm sees the same
batches. See docs/sbn.md for the layer itself.
"""

from .._callable import make_callable
from .arms import Arm, ArmError, parse_arm, parse_arms
from .report import StudyResult
from .run import RunRecord, study
from .stats import paired_difference, t_quantile, verdict
from .store import StudyError

__all__ = ["study", "StudyResult", "RunRecord", "Arm", "ArmError", "StudyError", "parse_arm",
           "parse_arms", "paired_difference", "t_quantile", "verdict"]

make_callable(__name__)  # sbn_surgery.study(...) calls study(); the name stays the package
