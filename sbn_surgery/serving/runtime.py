"""An exported file opened for serving: one onnxruntime CPU session, its checked metadata and
input, and batched logits, probabilities and top-k."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import ServingError
from ..onnx_io import decode_metadata
from ..onnx_io import open_session as _open_session
from .metadata import ServingInfo, read_serving_info, same_channels, sizes_agree
from .preprocess import EvalTransform

__all__ = ["ServingModel", "open_session", "softmax", "top_k"]

#: onnxruntime's name for a float32 tensor input.
FLOAT_INPUT = "tensor(float)"


def open_session(path: Union[str, Path, bytes], threads: Optional[int] = None):
    """An onnxruntime CPU session for a file (its external data checked first) or serialized
    model; one ServingError if it cannot be loaded (see :func:`sbn_surgery.onnx_io.open_session`)."""
    return _open_session(path, threads, ServingError)


def _dims(shape: Sequence) -> list[Optional[int]]:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


class ServingModel:
    """An exported classifier: ``info`` (its preprocessing and class names), ``transform``
    (timm's eval transform for it), ``logits(batch)``; ``batch_size`` is the file's fixed
    batch, or None where the batch axis is symbolic."""

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None) -> None:
        self.path = Path(path)
        self.session = open_session(self.path, threads)
        inputs = self.session.get_inputs()
        where = str(self.path)
        if len(inputs) != 1 or inputs[0].type != FLOAT_INPUT or len(inputs[0].shape) != 4:
            got = ", ".join(f"{i.name} {i.type} rank {len(i.shape)}" for i in inputs) or "none"
            raise ServingError(f"{where}: expected one float32 image input (N, C, H, W); the "
                               f"graph has {got}. Export the model with `sbn-surgery export`")
        self.input_name = inputs[0].name
        self.input_dims = _dims(inputs[0].shape)
        outputs = self.session.get_outputs()
        out_dims = _dims(outputs[0].shape) if outputs else []
        if len(out_dims) != 2:
            raise ServingError(f"{where}: expected a classifier's output (N, classes); the first "
                               f"output has rank {len(out_dims)}")
        meta = decode_metadata(self.session.get_modelmeta().custom_metadata_map.items())
        self.info: ServingInfo = read_serving_info(meta, where, out_dims[1])
        same_channels(self.info.data_config, self.input_dims[1], where)
        sizes_agree(self.info.data_config, self.input_dims, where)
        self.transform = EvalTransform(self.info.data_config, where)
        self.batch_size = self.input_dims[0]

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) of a preprocessed float32 batch (N, C, H, W); a file with a fixed
        batch size runs it in chunks of that size (the last one padded)."""
        step = self.batch_size or len(batch)
        parts = []
        for start in range(0, len(batch), max(step, 1)):
            chunk = batch[start:start + step]
            n = len(chunk)
            if self.batch_size and n < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            try:
                out = self.session.run(None, {self.input_name: np.ascontiguousarray(chunk)})[0]
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                text = " ".join(str(exc).split())[:300]
                raise ServingError(f"onnxruntime cannot run {self.path} on a batch of shape "
                                   f"{tuple(chunk.shape)}: {text}") from None
            out = np.asarray(out)
            if out.ndim != 2 or out.shape[1] != len(self.classes):  # a symbolic class axis
                raise ServingError(f"{self.path}: the graph returned logits of shape "
                                   f"{tuple(out.shape)} for {len(self.classes)} class names in "
                                   "its metadata; export the model again")
            parts.append(out[:n])
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the ``k`` most probable classes per row, most probable first
    (ties: the lower index first)."""
    probs = softmax(logits)
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=-1)


def batched(items: Iterable, size: int) -> Iterable[list]:
    """Lists of ``size`` consecutive items (the last one shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
