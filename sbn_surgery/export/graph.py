"""The written ONNX graph: recognizable SBN node names, metadata, shape fixes, saving, reading back.

Metadata keys (``ModelProto.metadata_props``), all under the ``sbn_surgery.`` prefix:
``version``, ``mode``, ``opset``, ``model_name``, ``recipe`` (YAML text), ``recipe_name``,
``input_size`` (JSON [C, H, W]), ``dynamic_batch``, ``dynamic_size`` (JSON booleans) and
``sites`` (JSON list: module path, stats, form, spatial size, BatchNorm folded into, and the
names of the graph tensors that hold the layer's output and flow into it, used by per-layer
parity).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import onnx

from ..errors import ExportError

__all__ = ["NODE_PREFIX", "META_PREFIX", "name_sbn_nodes", "set_metadata", "read_metadata",
           "drop_inferred_shapes", "name_dims", "save_model", "with_extra_outputs", "load",
           "input_dims"]

#: Nodes of an SBN layer are named ``SpectralBatchNorm/<module path>/<exporter's name>``.
NODE_PREFIX = "SpectralBatchNorm"
META_PREFIX = "sbn_surgery."
_SCOPES = "pkg.torch.onnx.name_scopes"
#: protobuf cannot serialize a message over 2 GiB; leave room for the graph itself.
_INLINE_LIMIT = 2 * 1024**3 - 64 * 1024**2


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    return []


def name_sbn_nodes(model: onnx.ModelProto, sites: list[dict[str, Any]]) -> None:
    """Prefix the nodes that each SBN layer's export form produced with
    ``SpectralBatchNorm/<path>/`` (found through the exporter's module name scopes), describe them
    in ``doc_string``, and store in each site dict the number of nodes, the name of the tensor
    that carries the layer's output (``"output"``; None when the scopes were lost) and the
    tensors flowing into the layer from outside (``"inputs"``: the layer's input, and maybe
    shape values shared with other layers)."""
    paths = {s["module"]: s for s in sites}
    members: dict[str, list[onnx.NodeProto]] = {p: [] for p in paths}
    for node in model.graph.node:
        owner = next((p for p in reversed(_scopes(node)[:-1]) if p in paths), None)
        if owner is None:
            continue
        members[owner].append(node)
        node.name = f"{NODE_PREFIX}/{owner}/{node.name}"
        site = paths[owner]
        doc = f"SpectralBatchNorm2d {owner} (stats={site['stats']}, export form {site['form']}"
        if site.get("folded_into"):
            doc += f"; per-channel scale folded into {site['folded_into']}"
        node.doc_string = doc + ")"
    graph_outputs = {o.name for o in model.graph.output}
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for path, nodes in members.items():
        produced = {o for n in nodes for o in n.output if o}
        inside = {id(n) for n in nodes}
        used_outside = {i for n in model.graph.node if id(n) not in inside for i in n.input}
        leaving = [o for n in nodes for o in n.output if o in produced and (o in used_outside or o in graph_outputs)]
        entering = []
        for n in nodes:
            for i in n.input:
                if i and i not in produced and i not in constants and i not in entering:
                    entering.append(i)
        paths[path]["nodes"] = len(nodes)
        paths[path]["output"] = leaving[-1] if leaving else None
        # candidates for the layer's input (per-layer parity picks the one of the right shape)
        paths[path]["inputs"] = entering


def drop_inferred_shapes(model: onnx.ModelProto) -> None:
    """Remove the exporter's intermediate shape annotations. For a one-sided inverse DFT they
    give the one-sided width instead of the signal length, and onnxruntime then fails with
    'Shape mismatch attempting to re-use buffer'; runtimes infer the shapes themselves."""
    del model.graph.value_info[:]


def name_dims(model: onnx.ModelProto, names: dict[int, str]) -> dict[int, bool]:
    """Give the symbolic dims of the first input readable names (axis -> name), renaming the same
    symbols in the outputs. Returns axis -> whether that axis is symbolic."""
    inp = model.graph.input[0].type.tensor_type.shape.dim
    rename: dict[str, str] = {}
    dynamic: dict[int, bool] = {}
    for axis, dim in enumerate(inp):
        dynamic[axis] = not dim.HasField("dim_value")
        if dynamic[axis] and axis in names:
            rename[dim.dim_param] = names[axis]
    for value in list(model.graph.input[:1]) + list(model.graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    return dynamic


def set_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Write ``meta`` into metadata_props under the ``sbn_surgery.`` prefix; non-strings as JSON."""
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.add(key=META_PREFIX + key, value=text)


def read_metadata(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """The ``sbn_surgery.`` metadata of an exported model (JSON values decoded); {} if none."""
    if not isinstance(model, onnx.ModelProto):
        model = load(model, load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(META_PREFIX):
            continue
        key = prop.key[len(META_PREFIX):]
        try:
            out[key] = json.loads(prop.value) if key not in ("recipe", "model_name", "recipe_name", "mode", "version") else prop.value
        except json.JSONDecodeError:
            out[key] = prop.value
    return out


def load(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, with a clear error when it is missing or not ONNX."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} not found; write one with `sbn-surgery export`.")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ExportError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or (t.ByteSize()) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` atomically (temp file in the same folder, then rename). One self-contained
    file when the weights fit in protobuf's 2 GiB limit, else the weights go to ``<name>.data``
    next to it. Returns the size in bytes of the .onnx file."""
    from ..files import atomic_write

    path = Path(path)
    if _initializer_bytes(model) < _INLINE_LIMIT:
        atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
    else:
        location = path.name + ".data"
        data = path.parent / location
        if data.exists():
            data.unlink()
        atomic_write(path, lambda tmp: onnx.save_model(
            model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=location))
    return path.stat().st_size


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (element types from
    ONNX type inference, float32 where unknown; shapes left open)."""
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


def input_dims(model: onnx.ModelProto) -> list[Optional[int]]:
    """The first input's dims, None where symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]
