"""Static int8 quantization of an exported file with onnxruntime's own tools.

onnxruntime's recommended path (``onnxruntime.quantization``): ``quant_pre_process`` (shape
inference and graph optimization), then ``quantize_static`` in QDQ format with per-channel int8
weights and uint8 activations (U8S8, the x86 default; VNNI runs it natively), calibrated by
min/max over the activations of images the caller preprocessed with the file's own transform
(a :class:`CalibrationDataReader`). What stays in float, and why:

* frequency-mode SBN layers (nodes ``SpectralBatchNorm/<module>/...`` of sites whose statistics
  are ``frequency``): a circular filter written as constant DFT matrices whose products sum
  thousands of terms of both signs; 8-bit matrices and their rounding would change the
  filter, not just round it, for a negligible share of the model's time;
* nothing else by default. Channel-mode SBN in ``fold`` form is elementwise arithmetic
  (its scale is folded into the BatchNorm before it, i.e. into the convolution) and quantizes
  like any other Add.

The accuracy check (int8 against float on labelled images) is the caller's
(``sbn_surgery.accuracy.quantize_onnx``); this module writes a file. It needs the onnx package
(onnxruntime's quantization tools use it) but neither torch nor timm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from ..errors import SbnSurgeryError, ServingError
from ..onnx_io import decode_metadata, load_onnx

__all__ = ["QuantizeResult", "quantize_file", "float_nodes"]

#: The node-name prefix export gives every SBN layer's nodes.
SBN_PREFIX = "SpectralBatchNorm/"


@dataclass
class QuantizeResult:
    """What :func:`quantize_file` wrote: ``float_nodes`` (node name prefix -> why it stays in
    float), the node counts of the float and int8 files."""

    path: str
    calibration_images: int
    float_nodes: dict[str, str] = field(default_factory=dict)
    quantized_ops: int = 0  # QuantizeLinear/DequantizeLinear pairs written

    def to_json(self) -> dict[str, Any]:
        return {"onnx": self.path, "calibration_images": self.calibration_images,
                "format": "QDQ", "activations": "uint8", "weights": "int8 per channel",
                "float_nodes": dict(self.float_nodes), "qdq_nodes": self.quantized_ops}


def float_nodes(model, meta: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(names of the nodes to keep in float, {node name prefix: why}) for an exported model and
    its decoded metadata: the nodes of frequency-mode SBN layers."""
    sites = meta.get("sites") if isinstance(meta.get("sites"), list) else []
    reasons, prefixes = {}, []
    for site in sites:
        if isinstance(site, dict) and site.get("stats") == "frequency" and site.get("module"):
            prefix = f"{SBN_PREFIX}{site['module']}/"
            prefixes.append(prefix)
            reasons[prefix] = ("frequency-mode SBN: a circular filter as constant DFT matrices; "
                               "8-bit matrices would change the filter")
    names = [n.name for n in model.graph.node if any(n.name.startswith(p) for p in prefixes)]
    return names, reasons


def _reader(input_name: str, batches: Iterable[np.ndarray]):
    """onnxruntime's CalibrationDataReader over preprocessed batches (the class is made here,
    so that importing this module does not import onnxruntime.quantization)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self._it, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch)}

    return Reader()


def _preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's ``quant_pre_process`` (onnx shape inference, graph optimization). Its
    symbolic shape inference is skipped: it does not complete on a graph with a symbolic spatial
    size (and then writes a file into the working directory), and onnx's own shape inference
    serves a CNN. A file it cannot process is quantized as it is."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception:  # noqa: BLE001 - an optional optimization: quantize the file as exported
        return src


def _copy_metadata(src_meta: dict[str, str], path: Path, extra: dict[str, Any]) -> int:
    """Write the float file's metadata (and ``extra``) into the quantized file; the count of
    Q/DQ nodes in it."""
    import onnx

    from ..onnx_io import set_onnx_metadata

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in src_meta.items():
        model.metadata_props.add(key=key, value=value)
    meta = decode_metadata(src_meta.items())
    meta.update(extra)
    set_onnx_metadata(model, meta)
    onnx.save(model, str(path))
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node)


def quantize_file(src: Union[str, Path], dst: Union[str, Path], batches: Iterable[np.ndarray],
                  images: int) -> QuantizeResult:
    """Quantize ``src`` to ``dst`` (written atomically; nothing checked here) calibrated on
    ``batches`` (float32, preprocessed, ``images`` in all)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    model = load_onnx(src, load_external_data=False)  # its external data checked
    src_meta = {p.key: p.value for p in model.metadata_props}
    meta = decode_metadata(src_meta.items())
    exclude, reasons = float_nodes(model, meta)
    input_name = next(i.name for i in model.graph.input
                      if i.name not in {t.name for t in model.graph.initializer})
    del model
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".quantize", dir=dst.parent))
    try:
        pre = _preprocess(src, work / "pre.onnx")
        out = work / dst.name
        try:
            quantize_static(str(pre), str(out), _reader(input_name, batches),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibTensorRangeSymmetric": False})
        except SbnSurgeryError:
            raise  # the calibration images' own error (unreadable, too large), not onnxruntime's
        except Exception as exc:  # noqa: BLE001 - onnxruntime's tools raise many types
            text = " ".join(str(exc).split())[:300]
            raise ServingError(f"onnxruntime could not quantize {src}: {type(exc).__name__}: "
                               f"{text}") from None
        quantization = {"format": "QDQ", "activations": "uint8", "weights": "int8 per channel",
                        "calibration_images": int(images), "float_nodes": reasons}
        qdq = _copy_metadata(src_meta, out, {"quantization": quantization})
        os.replace(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(str(dst), int(images), reasons, qdq)
