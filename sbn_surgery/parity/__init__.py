"""Parity and latency of exported files in onnxruntime.

``check_parity`` runs a file and the PyTorch model on the same inputs and reports the error
(:mod:`.check`); ``bench`` times files side by side, alone or against a baseline (:mod:`.latency`); both open
files through :func:`session` (:mod:`.runtime`) and report with the dataclasses in :mod:`.reports`.
"""

from .check import check_parity, default_rtol
from .latency import bench
from .reports import BenchReport, FileLatency, LayerParity, ParityCase, ParityFailed, ParityReport
from .runtime import session

__all__ = ["ParityReport", "ParityCase", "LayerParity", "ParityFailed", "BenchReport",
           "FileLatency", "check_parity", "default_rtol", "bench", "session"]
