"""onnxruntime sessions, and the input size a file takes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import ParityError

__all__ = ["session", "input_chw"]


def session(model: Union[str, Path, bytes], threads: Optional[int] = None):
    """An onnxruntime CPU session for a file path or serialized model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        name = "the model" if isinstance(model, bytes) else str(model)
        raise ParityError(f"onnxruntime cannot load {name}: {str(exc).strip()[:400]}") from None


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
    fixed = dims[1:4]
    if any(d is not None and d != v for d, v in zip(fixed, size)):
        takes = "x".join("?" if d is None else str(d) for d in fixed)
        raise ParityError(
            f"{path} takes input N x {takes}, not {'x'.join(map(str, size))}; leave out "
            "--input-size, or export a file of that size"
        )
    return size  # type: ignore[return-value]
