"""Hostile ONNX files: external-data locations are checked by this tool itself, before onnx or
onnxruntime read anything, whatever their versions check (this module runs at the declared
floors too: .ci/floors). A location must name a regular file inside the model's folder: no
absolute path, no '..', no symbolic link leading out, no FIFO or device."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error

from sbn_surgery.errors import ExportError
from sbn_surgery.onnx_io import load_onnx


def _model_with_external_weight(folder: Path, location: str = "w.bin") -> Path:
    """y = x + W, W (1, 3, 1, 1) float32 kept in ``folder/location``; returns the .onnx path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _set_location(path: Path, location: str) -> None:
    """Point every external tensor of the file at ``location`` (the file is rewritten as is)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def no_reader(monkeypatch):
    """Fail the test if onnx's external-data reader or an onnxruntime session is reached."""
    import onnx.external_data_helper as helper
    import onnxruntime

    def reached(*args, **kwargs):
        raise AssertionError("a refused file reached onnx or onnxruntime")

    monkeypatch.setattr(helper, "load_external_data_for_model", reached)
    monkeypatch.setattr(onnxruntime, "InferenceSession", reached)


def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.arange(3, dtype=np.float32).tobytes())
    return secret


def _model_and_outside_file(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(a data file outside the model's folder, the folder, a model in it whose weight is kept
    in ``w.bin`` beside it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    return _outside(tmp_path), folder, _model_with_external_weight(folder)


CASES = {
    "parent": ("../outside/secret.bin", "a '..' component"),
    "parent-inside": ("sub/../../outside/secret.bin", "a '..' component"),
    "absolute": ("{secret}", "an absolute path"),
    "backslash-absolute": ("\\\\server\\share\\w.bin", "an absolute path"),
    "drive": ("C:\\w.bin", "an absolute path"),
    "empty": ("", "an empty location"),
    "missing": ("nothing-here.bin", "a file that does not exist"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_external_data_outside_the_folder_is_refused_before_reading(run_cli, tmp_path, no_reader,
                                                                    case):
    secret, folder, path = _model_and_outside_file(tmp_path)
    location, why = CASES[case]
    _set_location(path, location.format(secret=secret))
    with pytest.raises(ExportError, match="keeps its data at .*" + why):
        load_onnx(path)
    one_line_error(run_cli("bench", path, "--repeats", "1"), "m.onnx", "tensor 'W'", why,
                   "Refused before reading it")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["link-out", "link-inside", "fifo", "device"])
def test_external_data_links_out_and_special_files_are_refused(run_cli, tmp_path, no_reader,
                                                               kind):
    secret, folder, path = _model_and_outside_file(tmp_path)
    data = folder / "w.bin"
    data.unlink()
    if kind == "link-out":  # a name inside the folder that leads out of it
        os.symlink(secret, data)
        why = "a link that leads outside the model's folder"
    elif kind == "link-inside":  # refused as onnx 1.18 and newer refuse it, at any version
        (folder / "w2.bin").write_bytes(secret.read_bytes())
        os.symlink("w2.bin", data)
        why = "a symbolic link"
    elif kind == "fifo":  # reading it would wait for a writer forever
        os.mkfifo(data)
        why = "something other than a regular file"
    else:  # inside the folder, but a link to a device
        os.symlink("/dev/zero", data)
        why = "a link that leads outside"
    one_line_error(run_cli("bench", path, "--repeats", "1"), "tensor 'W'", why)


@pytest.mark.timeout(60)
def test_external_data_inside_the_folder_is_read(run_cli, tmp_path):
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    path = _model_with_external_weight(folder, "data/w.bin")
    model = load_onnx(path)
    from onnx import numpy_helper

    weight = numpy_helper.to_array(model.graph.initializer[0])
    assert weight.ravel().tolist() == [0.0, 1.0, 2.0]
    res = run_cli("bench", path, "--repeats", "1", "--json")
    assert res.code == 0, res.stderr


@pytest.mark.timeout(60)
def test_external_data_in_a_subgraph_is_checked_too(tmp_path, no_reader):
    """A tensor of an If node's branch (a subgraph attribute) with a location outside."""
    import onnx
    from onnx import TensorProto, helper

    secret = _outside(tmp_path)
    tensor = helper.make_tensor("C", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=str(secret))
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=tensor)], "b", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    path = tmp_path / "if.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ExportError, match="tensor 'C' keeps its data at .* an absolute path"):
        load_onnx(path, load_external_data=False)
    assert onnx.load(str(path), load_external_data=False).graph.node[0].op_type == "If"


def _tensor_fields(descriptor, seen=None) -> dict[str, dict[str, object]]:
    """{message: {field: descriptor}} of every field of onnx.proto on a path from ``descriptor``
    to a TensorProto, and TensorProto's own fields that say where its data is."""
    seen = {} if seen is None else seen
    if descriptor.name in seen:
        return seen
    seen[descriptor.name] = {}
    if descriptor.name == "TensorProto":
        seen["TensorProto"] = {n: descriptor.fields_by_name[n]
                               for n in ("name", "external_data", "data_location")}
        entry = descriptor.fields_by_name["external_data"].message_type
        seen["StringStringEntryProto"] = dict(entry.fields_by_name)
        return seen
    for field in descriptor.fields:
        sub = field.message_type
        if sub is not None and _reaches_tensor(sub):
            seen[descriptor.name][field.name] = field
            _tensor_fields(sub, seen)
    return seen


def _reaches_tensor(descriptor, stack=()) -> bool:
    if descriptor.name == "TensorProto":
        return True
    return descriptor.name not in stack and any(
        f.message_type is not None and _reaches_tensor(f.message_type, stack + (descriptor.name,))
        for f in descriptor.fields)


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def test_the_skeleton_has_every_field_of_onnx_that_leads_to_a_tensor():
    """The torch-free and onnx-free check (a serving box) parses files with a subset of
    onnx.proto: each of its fields has onnx's number, type and cardinality, and no field of
    onnx's schema that can hold a tensor is missing from it (at this onnx version)."""
    import onnx

    from sbn_surgery.onnx_io import SKELETON, _skeleton_class

    want = _tensor_fields(onnx.ModelProto.DESCRIPTOR)
    ours = _skeleton_class().DESCRIPTOR.file.message_types_by_name
    assert set(want) == set(SKELETON)
    for message, fields in want.items():
        assert {name for name, *_ in SKELETON[message]} == set(fields), message
        for name, field in fields.items():
            got = ours[message].fields_by_name[name]
            assert (got.number, got.type, _repeated(got)) == \
                (field.number, field.type, _repeated(field)), f"{message}.{name}"


@pytest.mark.timeout(60)
def test_external_data_of_a_training_graph_is_checked_too(tmp_path, no_reader):
    """ModelProto.training_info holds graphs with initializers: checked like the main graph's,
    with onnx (load_onnx) and without it (check_onnx_file, what serving uses)."""
    import onnx

    from sbn_surgery.onnx_io import check_onnx_file

    secret, folder, path = _model_and_outside_file(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    tensor = onnx.helper.make_tensor("T", onnx.TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=str(secret))
    info = model.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(tensor)
    path.write_bytes(model.SerializeToString())
    for check in (load_onnx, check_onnx_file):
        with pytest.raises(ExportError, match="tensor 'T' keeps its data at .* an absolute path"):
            check(path)
