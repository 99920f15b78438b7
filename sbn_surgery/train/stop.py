"""Stopping a run on a signal: Ctrl-C (SIGINT) and SIGTERM, which SLURM and Kubernetes send
before they preempt a job, and ``kill`` sends by default.

The first signal only sets a flag, which the loop checks between steps (all-reduced under DDP,
so every rank stops at the same step) before it writes a resumable state; a second signal
raises ``KeyboardInterrupt`` at once. DataLoader worker processes ignore Ctrl-C and outlive a
SIGTERM by a grace period (see ``data/loaders.py``): a scheduler that signals every process of a
job (and Ctrl-C, which reaches the whole process group) would otherwise end them under the step
that is finishing.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["STOP_SIGNALS", "StopFlag"]

#: The signals that stop a run with its state saved: Ctrl-C, and a scheduler's preemption.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """SIGINT or SIGTERM sets a flag (checked between steps); a second one raises at once."""

    def __init__(self) -> None:
        self.set = False
        self.signum = int(signal.SIGINT)
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.set:
            raise KeyboardInterrupt
        self.set, self.signum = True, int(signum)

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

