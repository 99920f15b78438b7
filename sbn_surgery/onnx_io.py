"""Reading and annotating ONNX files: the one place that knows how sbn-surgery's metadata is
stored in a file, shared by export (which writes files), parity and serving (which read them);
and the one place that opens a file in onnxruntime (:func:`open_session`), after checking its
external data (:func:`check_onnx_file`, without the onnx package, which a serving box lacks).

Metadata keys (``ModelProto.metadata_props``), all under the ``sbn_surgery.`` prefix:
``version``, ``mode``, ``opset``, ``model_name``, ``recipe`` (YAML text), ``recipe_name``,
``input_size`` (JSON [C, H, W]), ``dynamic_batch``, ``dynamic_size`` (JSON booleans) and
``sites`` (JSON list: module path, stats, form, spatial size, BatchNorm folded into, and the
names of the graph tensors that hold the layer's output and flow into it, used by per-layer
parity); for serving (see :mod:`sbn_surgery.serving`, which reads them without the onnx
package): ``data_config`` (JSON: timm's eval data config, ``input_size``, ``mean``, ``std``,
``interpolation``, ``crop_pct``, ``crop_mode``), ``classes`` (JSON list: the name of each output
index) and ``classes_source`` (where the names came from: the fine-tuning data, timm's label
set, or ``indices`` when none is known).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Union

from .errors import ExportError, SbnSurgeryError

if TYPE_CHECKING:  # onnx is imported where a file is read: the CLI imports this module to start
    import onnx

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "META_PREFIX", "load_onnx", "check_external_data",
           "check_onnx_file", "open_session", "read_onnx_metadata", "set_onnx_metadata",
           "input_dims", "with_extra_outputs", "decode_metadata"]

#: The opset files are written at unless asked otherwise.
DEFAULT_OPSET = 20
#: ONNX DFT exists from opset 17, but torch.onnx writes opset 18 and newer only: its down-converter
#: fails on Pad and ReduceMean, so opset 17 is refused up front rather than half-written.
MIN_OPSET = 18
META_PREFIX = "sbn_surgery."
#: Metadata values stored as plain text; every other key holds JSON.
_TEXT_KEYS = ("recipe", "model_name", "recipe_name", "mode", "version", "classes_source")


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, with a clear error when it is missing or not ONNX. Its external-data
    locations are checked (:func:`check_external_data`) before any is read, and before
    onnxruntime is given the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} not found; write one with `sbn-surgery export`.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ExportError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    check_external_data(model, path)
    if load_external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001 - a short or unreadable data file
            raise ExportError(f"the external data of {path} cannot be read ({type(exc).__name__}"
                              f": {' '.join(str(exc).split())[:200]})") from None
    return model


#: ``TensorProto.DataLocation.EXTERNAL`` in onnx.proto.
_EXTERNAL = 1
#: The fields of onnx.proto (the same names, numbers and types) that lead to every tensor of a
#: model and say where its data is: (name, number, type, repeated). A file parsed with them alone
#: (every other field skipped) is its skeleton, checked without the onnx package, which a serving
#: box does not have (protobuf comes with onnxruntime).
SKELETON = {
    "ModelProto": [("graph", 7, "GraphProto", False), ("functions", 25, "FunctionProto", True),
                   ("training_info", 20, "TrainingInfoProto", True)],
    "TrainingInfoProto": [("initialization", 1, "GraphProto", False),
                          ("algorithm", 2, "GraphProto", False)],
    "GraphProto": [("node", 1, "NodeProto", True), ("initializer", 5, "TensorProto", True),
                   ("sparse_initializer", 15, "SparseTensorProto", True)],
    "FunctionProto": [("node", 7, "NodeProto", True), ("attribute_proto", 11, "AttributeProto",
                                                       True)],
    "NodeProto": [("attribute", 5, "AttributeProto", True)],
    "AttributeProto": [("t", 5, "TensorProto", False), ("g", 6, "GraphProto", False),
                       ("tensors", 10, "TensorProto", True), ("graphs", 11, "GraphProto", True),
                       ("sparse_tensor", 22, "SparseTensorProto", False),
                       ("sparse_tensors", 23, "SparseTensorProto", True)],
    "SparseTensorProto": [("values", 1, "TensorProto", False),
                          ("indices", 2, "TensorProto", False)],
    "TensorProto": [("name", 8, "string", False),
                    ("external_data", 13, "StringStringEntryProto", True),
                    ("data_location", 14, "DataLocation", False)],
    "StringStringEntryProto": [("key", 1, "string", False), ("value", 2, "string", False)],
}
_SKELETON_PACKAGE = "sbn_surgery_onnx_skeleton"


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor in ``model`` (an ``onnx.ModelProto`` or a file's skeleton): wherever
    :data:`SKELETON` leads, i.e. initializers (sparse ones too) and attribute tensors, in the main
    graph, every subgraph, every local function (default attributes too) and training graphs;
    the main graph's first, in the file's order."""
    todo = collections.deque([model])
    while todo:
        message = todo.popleft()
        kind = message.DESCRIPTOR.name
        if kind == "TensorProto":
            yield message
            continue
        for name, _, _, repeated in SKELETON.get(kind, ()):
            if repeated:
                todo.extend(getattr(message, name))
            elif message.HasField(name):
                todo.append(getattr(message, name))


def _location_problem(location: str, folder: Path) -> Optional[str]:
    """Why an external-data ``location`` may not be read, or None: it must name a regular file
    inside ``folder`` (no absolute path, no ``..``, no link that leads out, not a link itself)."""
    if not location:
        return "an empty location"
    parts = location.replace("\\", "/").split("/")
    if location.startswith(("/", "\\")) or os.path.isabs(location) or re.match(r"[A-Za-z]:", location):
        return "an absolute path"
    if ".." in parts:
        return "a '..' component"
    base = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, target]) != base:
        return "a link that leads outside the model's folder"
    if os.path.islink(os.path.join(base, location)):  # as onnx itself refuses (1.18 and newer)
        return "a symbolic link"
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return "a file that does not exist"
    if not stat.S_ISREG(mode):
        return "something other than a regular file"
    return None


def check_external_data(model, path: str | Path,
                        error: type[SbnSurgeryError] = ExportError) -> None:
    """Refuse an ONNX file whose tensors keep their data outside the file's folder: an absolute
    location, a ``..`` component, a symbolic link leading out, or no regular file at all. This
    tool checks it itself, before onnx or onnxruntime read any of it, whatever their versions
    check. ``model``: the file's ``onnx.ModelProto``, or its skeleton (:func:`check_onnx_file`);
    ``error``: the error class raised."""
    path = Path(path)
    for tensor in _tensors(model):
        if tensor.data_location != _EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        problem = _location_problem(location, path.parent)
        if problem:
            shown = repr(location[:100] + ("..." if len(location) > 100 else ""))
            raise error(f"{path}: tensor {tensor.name[:60]!r} keeps its data at {shown}, "
                        f"{problem}; external data must be a file in the model's folder "
                        f"({path.parent}). Refused before reading it.")


@functools.lru_cache(maxsize=1)
def _skeleton_class():
    """The message class of :data:`SKELETON`'s ``ModelProto``, built with protobuf at first use."""
    from google.protobuf import descriptor_pb2, message_factory

    field_type = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name=f"{_SKELETON_PACKAGE}.proto",
                                               package=_SKELETON_PACKAGE, syntax="proto2")
    location = proto.enum_type.add(name="DataLocation")
    location.value.add(name="DEFAULT", number=0)
    location.value.add(name="EXTERNAL", number=_EXTERNAL)
    for message, fields in SKELETON.items():
        spec = proto.message_type.add(name=message)
        for name, number, kind, repeated in fields:
            f = spec.field.add(name=name, number=number, label=field_type.LABEL_REPEATED
                               if repeated else field_type.LABEL_OPTIONAL)
            if kind == "string":
                f.type = field_type.TYPE_STRING
            else:
                f.type = field_type.TYPE_ENUM if kind == "DataLocation" else \
                    field_type.TYPE_MESSAGE
                f.type_name = f".{_SKELETON_PACKAGE}.{kind}"
    return message_factory.GetMessages([proto])[f"{_SKELETON_PACKAGE}.ModelProto"]


def check_onnx_file(path: str | Path, error: type[SbnSurgeryError] = ExportError) -> None:
    """Check a file before onnxruntime is given it, without the onnx package: it exists, parses
    as an ONNX model, and its external data passes :func:`check_external_data`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"ONNX file {path} not found; write one with `sbn-surgery export`")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    try:
        skeleton = _skeleton_class().FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or too deep a nesting
        raise error(f"cannot load {path}: it does not parse as an ONNX model "
                    f"({type(exc).__name__}); is it an ONNX file?") from None
    del data
    check_external_data(skeleton, path, error)


def open_session(model: Union[str, Path, bytes], threads: Optional[int] = None,
                 error: type[SbnSurgeryError] = ExportError):
    """An onnxruntime CPU session for a file, checked first (:func:`check_onnx_file`), or for a
    serialized model (which must hold its tensors); ``threads``: intra-op threads (None:
    onnxruntime's choice). A file onnxruntime cannot load is one ``error``."""
    import onnxruntime as ort

    if not isinstance(model, bytes):
        check_onnx_file(model, error)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        name = "the model" if isinstance(model, bytes) else str(model)
        text = " ".join(str(exc).split())[:300]
        raise error(f"onnxruntime cannot load {name} ({text}); is it an ONNX file?") from None


def set_onnx_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Write ``meta`` into metadata_props under the ``sbn_surgery.`` prefix; non-strings as JSON."""
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.add(key=META_PREFIX + key, value=text)


def read_onnx_metadata(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """The ``sbn_surgery.`` metadata of an exported model (JSON values decoded); {} if none."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model, load_external_data=False)
    return decode_metadata((prop.key, prop.value) for prop in model.metadata_props)


def decode_metadata(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The ``sbn_surgery.`` entries of (key, value) metadata pairs, prefix removed and JSON
    values decoded (a value that is not JSON stays text); for ``metadata_props`` and for
    onnxruntime's ``get_modelmeta().custom_metadata_map`` alike."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not key.startswith(META_PREFIX):
            continue
        key = key[len(META_PREFIX):]
        if key in _TEXT_KEYS:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            out[key] = value
    return out


def input_dims(model: onnx.ModelProto) -> list[Optional[int]]:
    """The first input's dims, None where symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (element types from
    ONNX type inference, float32 where unknown; shapes left open)."""
    import onnx

    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - inference is only a help here
        types = {}
    present = {o.name for o in extra.graph.output}
    for name in names:
        if name and name not in present:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            extra.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            present.add(name)
    return extra
