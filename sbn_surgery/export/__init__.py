"""ONNX export of converted models: the SBN export forms (forms.py), the export-ready copy of a
model with forms swapped in and scales folded (prepare.py), the written graph's node names, shape
fixes and saving (graph.py), and the checked options, trace and finalized file (exporter.py).

This package writes files and knows nothing of parity; ``sbn_surgery.export_onnx``
(:mod:`sbn_surgery.deploy`) writes a file and proves its parity in one call.
"""

from __future__ import annotations

from ..onnx_io import read_onnx_metadata
from .exporter import (DEFAULT_OPSET, EXPORT_STEPS, MIN_OPSET, MODES, ExportResult, SiteExport,
                       check_export_options, prepare_export_model, write_onnx)
from .forms import CornerForm, DftForm, MatmulForm, SBNForm, build_form
from .graph import NODE_PREFIX

#: The metadata of an exported file (:func:`sbn_surgery.onnx_io.read_onnx_metadata`).
read_metadata = read_onnx_metadata

__all__ = ["write_onnx", "check_export_options", "ExportResult", "SiteExport", "MODES",
           "DEFAULT_OPSET", "MIN_OPSET", "EXPORT_STEPS", "prepare_export_model", "build_form",
           "SBNForm", "CornerForm", "DftForm", "MatmulForm", "NODE_PREFIX", "read_metadata",
           "read_onnx_metadata"]
