"""onnxruntime sessions, and the input size a file takes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import ParityError
from ..onnx_io import open_session

__all__ = ["session", "input_chw", "image_input_dims", "check_numel", "run"]

#: The most elements one input batch may have (1 GiB of float32): a file or --input-size that
#: declares more is refused before anything is allocated.
MAX_INPUT_ELEMENTS = 1 << 28


def image_input_dims(proto, path) -> list[Optional[int]]:
    """The dims (None where symbolic) of the one float32 (N, C, H, W) input of ``proto``;
    a :class:`ParityError` naming ``path`` for anything else (no input, two inputs, another
    element type, another rank, a zero or negative dimension)."""
    import onnx

    init = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise ParityError(f"{path}: expected one image input (N, C, H, W); the graph has "
                          f"{len(inputs)} ({', '.join(i.name for i in inputs) or 'none'}). Is "
                          "this a file from `sbn-surgery export`?")
    ttype = inputs[0].type.tensor_type if inputs[0].type.HasField("tensor_type") else None
    if ttype is None or ttype.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(ttype.elem_type) if ttype is not None else \
            inputs[0].type.WhichOneof("value") or "untyped"
        raise ParityError(f"{path}: input {inputs[0].name!r} is {kind}; sbn-surgery runs float32 "
                          "image inputs (FLOAT) only.")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
    if len(dims) != 4:
        raise ParityError(f"{path}: expected one image input (N, C, H, W); input "
                          f"{inputs[0].name!r} has {len(dims)} dims")
    bad = [d for d in dims if d is not None and d < 1]
    if bad:
        raise ParityError(f"{path}: input {inputs[0].name!r} declares a dimension of {bad[0]} "
                          f"(shape {'x'.join('?' if d is None else str(d) for d in dims)}); an "
                          "image input has every dimension >= 1.")
    return dims


def check_numel(shape: Sequence[int], path) -> None:
    """Refuse an input batch of more than :data:`MAX_INPUT_ELEMENTS` before it is allocated."""
    n = 1
    for d in shape:
        n *= int(d)
    if n > MAX_INPUT_ELEMENTS:
        raise ParityError(f"{path}: an input of shape {tuple(int(d) for d in shape)} has {n} "
                          f"elements, more than {MAX_INPUT_ELEMENTS}; use a smaller --input-size "
                          "or --batch.")


def run(sess, feed: dict, path) -> list:
    """``sess.run`` with onnxruntime's failures (a graph that cannot run at this input) as one
    :class:`ParityError` naming ``path``."""
    try:
        return sess.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        text = " ".join(str(exc).split())[:400]
        raise ParityError(f"onnxruntime cannot run {path} on input "
                          f"{[tuple(v.shape) for v in feed.values()]}: {text}") from None


def session(model: Union[str, Path, bytes], threads: Optional[int] = None):
    """An onnxruntime CPU session for a file path (its external data checked first) or
    serialized model; one ParityError if it cannot be loaded (see
    :func:`sbn_surgery.onnx_io.open_session`)."""
    return open_session(model, threads, ParityError)


def input_chw(dims: Sequence[Optional[int]], meta: dict, input_size, path) -> tuple[int, int, int]:
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
    else:
        fallback = meta.get("input_size") or [None, None, None]
        size = tuple(d if d is not None else f for d, f in zip(dims[1:4], fallback))  # type: ignore[misc]
    if len(size) != 3 or any(v is None for v in size):
        raise ParityError(
            f"{path}: the input's spatial size is symbolic and the file has no sbn-surgery "
            "metadata; pass the input size (--input-size C H W)."
        )
    if any(int(v) < 1 for v in size):
        raise ParityError(f"{path}: input size {'x'.join(map(str, size))} has a dimension below 1")
    fixed = dims[1:4]
    if any(d is not None and d != v for d, v in zip(fixed, size)):
        takes = "x".join("?" if d is None else str(d) for d in fixed)
        raise ParityError(
            f"{path} takes input N x {takes}, not {'x'.join(map(str, size))}; leave out "
            "--input-size, or export a file of that size"
        )
    return size  # type: ignore[return-value]
