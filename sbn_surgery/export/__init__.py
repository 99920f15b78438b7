"""ONNX export of converted models, in three SBN forms (see forms.py), with metadata and
recognizable SBN node names (graph.py); export_onnx (exporter.py) ties them together."""

from __future__ import annotations

from .exporter import (DEFAULT_OPSET, MIN_OPSET, MODES, ExportResult, SiteExport, export_onnx,
                       prepare_export_model)
from .forms import CornerForm, DftForm, MatmulForm, SBNForm, build_form
from .graph import NODE_PREFIX, read_metadata

__all__ = ["export_onnx", "ExportResult", "SiteExport", "MODES", "DEFAULT_OPSET", "MIN_OPSET",
           "prepare_export_model", "build_form", "SBNForm", "CornerForm", "DftForm", "MatmulForm",
           "NODE_PREFIX", "read_metadata"]
