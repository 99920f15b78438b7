"""Paired A/B studies: does SBN help this model on this data, and by more than seed noise?

``study(model, data, arms=["none", "resnet", "resnet:frequency"], seeds=3, epochs=...)`` runs
one ordinary ``finetune`` per arm and seed into ``output/<arm dir>/seed<k>/`` and reports, per
arm, the mean and std of the last epoch's val top-1 and loss, images/s and the train-step time
relative to ``none``, the feature-map RMS growth at initialization (diagnose), the feature maps at
the SBN sites (max |x|, RMS, spectral entropy, measured at initialization and after every epoch),
and for each arm the paired differences against ``none`` (top-1 and those measures) with 95 %
t-intervals over seeds. ``from_study=DIR`` starts every arm of seed k from an earlier study's
trained ``none/seed<k>/best.safetensors``: the tool's own workflow (convert a trained model with
identity init, fine-tune) against fine-tuning it without SBN.

Parts, by what each owns:

* ``arms``: arm specs, their directory names, the arm's model at initialization.
* ``features``: the feature-map measures at the SBN sites, and where an arm without SBN is
  measured.
* ``setup``: what every run shares (data, sizes, calibration and measuring images, building an
  arm's model, ``--from-study`` weights).
* ``stats``: means, the t-interval (scipy, else a table), the verdict.
* ``store``: ``study.json`` (the options, refusing others; the measures once done),
  ``init.json``, each run's ``features.json``, reading runs, tidying finished ones.
* ``run``: the runs in order (seed by seed, every arm), resume, progress.
* ``report``: the summary and ``report.json``; ``plots``: ``study.png``,
  ``study_features.png``.

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
