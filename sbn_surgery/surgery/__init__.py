"""Model surgery: match a recipe's rules to modules, insert or remove SBN, calibrate, init.

The parts: the site and plan records, shared constants and module-path helpers (plan.py); the
probe forward and rule matching (match.py); the hooks, inserting, removing and finding SBN
(insert.py); calibration and initialization of the inserted layers (init.py).

How SBN sits in a converted model (the original ``state_dict`` keys never change):

* ``after``: the SBN is a child named ``sbn`` of the matched module (the host) and a forward hook
  on the host returns ``host.sbn(output)``. In a fused norm+act module (timm ``BatchNormAct2d``)
  the SBN goes between the norm and the activation: the host is then its ``drop`` child and a
  forward pre-hook applies the SBN to the normalized input of ``drop``.
* ``before``: child ``sbn`` of the matched module, applied by a forward pre-hook to its input.
* ``replace``: the SBN stands at the matched path; the original module is kept (unregistered) on
  it so :func:`strip_sbn` can put it back.

Hooks look the SBN up as ``host.sbn`` when they run, so another module can take its place (export
forms do this). New ``state_dict`` keys are ``<host path>.sbn.{weight, bias, running_mean,
running_var, num_batches_tracked}``.
"""

from __future__ import annotations

from .init import calibrate, carry_zero_init, init_identity, synthetic_batches
from .insert import _sbn_after_hook, _sbn_before_hook  # noqa: F401 - pickles name them here
from .insert import apply_recipe, find_sbn, strip_sbn
from ..progress import ProgressFn  # noqa: F401 - kept importable from here; defined in progress
from .plan import FOLDABLE_NORMS, Plan, Site

__all__ = ["Site", "Plan", "apply_recipe", "strip_sbn", "find_sbn", "calibrate", "init_identity",
           "carry_zero_init", "synthetic_batches", "FOLDABLE_NORMS"]
