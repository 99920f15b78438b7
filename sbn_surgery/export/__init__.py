"""ONNX export of converted models: the SBN export forms (forms.py), the export-ready copy of a
model with forms swapped in and scales folded (prepare.py), the written graph's names, metadata
and saving (graph.py), and export_onnx, which traces, writes and checks parity (exporter.py)."""

from __future__ import annotations

from .exporter import (DEFAULT_OPSET, MIN_OPSET, MODES, ExportResult, SiteExport, export_onnx,
                       prepare_export_model)
from .forms import CornerForm, DftForm, MatmulForm, SBNForm, build_form
from .graph import NODE_PREFIX, read_metadata

__all__ = ["export_onnx", "ExportResult", "SiteExport", "MODES", "DEFAULT_OPSET", "MIN_OPSET",
           "prepare_export_model", "build_form", "SBNForm", "CornerForm", "DftForm", "MatmulForm",
           "NODE_PREFIX", "read_metadata"]
