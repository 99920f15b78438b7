"""The written ONNX graph: recognizable SBN node names, shape fixes, saving.

Reading files and the metadata format live in :mod:`sbn_surgery.onnx_io`, which parity reads
files with too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import onnx

from ..files import atomic_write

__all__ = ["NODE_PREFIX", "name_sbn_nodes", "drop_inferred_shapes", "name_dims", "save_model"]

#: Nodes of an SBN layer are named ``SpectralBatchNorm/<module path>/<exporter's name>``.
NODE_PREFIX = "SpectralBatchNorm"
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


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or (t.ByteSize()) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` atomically (temp file in the same folder, then rename). One self-contained
    file when the weights fit in protobuf's 2 GiB limit, else the weights go to ``<name>.data``
    next to it. Returns the size in bytes of the .onnx file."""
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
