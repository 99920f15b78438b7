"""CPU threads that yield when they wait, so a run shares a busy machine fairly.

PyTorch's CPU kernels run on OpenMP threads, and by default a thread that finishes its share of a
parallel region spins for a while waiting for the others. On an idle machine that saves a wake-up;
on a busy one (a laptop, a shared server, CI) the spinning threads burn the time slices the
straggler they wait for needs, and every parallel region waits on the slowest thread. Measured on
2 cores beside two processes that spin a core each, a small-CNN training step took 2.7-3.5x
longer with spinning threads than with passive ones or with one thread (``python
benchmarks/contention.py`` gives the figures for the quickstart).

OpenMP reads its wait policy once, when torch's runtime loads, so this must run before ``import
torch``: the package does it first thing on import. A value the user set is kept, and so is the
process's policy if torch was already imported.
"""

from __future__ import annotations

import os
import sys


def prefer_passive_waiting() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy or torch is already loaded.
    Returns whether it was set here."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
