"""Top-k predictions of an exported classifier on image files and folders, batched."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import ServingError
from ..imaging import IMAGE_SUFFIXES, has_images, load_image, scan_folder
from ..progress import ProgressFn
from .runtime import ServingModel, batched, top_k

__all__ = ["Prediction", "predict", "list_images", "IMAGE_SUFFIXES"]

#: The most images one call takes (a folder tree of millions is a job for a data loader).
MAX_IMAGES = 1_000_000


@dataclass
class Prediction:
    """The ``k`` most probable classes of one image, most probable first."""

    image: str
    indices: list[int]
    classes: list[str]
    probs: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "top_k": [
            {"index": i, "class": c, "prob": p}
            for i, c, p in zip(self.indices, self.classes, self.probs)]}


@dataclass
class Predictions:
    """What :func:`predict` found: one :class:`Prediction` per image, in order."""

    onnx: str
    predictions: list[Prediction] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # the file's ServingInfo

    def to_json(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "model": self.model,
                "predictions": [p.to_json() for p in self.predictions]}


def _folder_images(folder: Path) -> list[str]:
    """Every image file under ``folder`` (links followed once per real path), sorted."""
    if not has_images(folder, IMAGE_SUFFIXES):
        return []
    parent, name = os.path.split(os.path.normpath(str(folder)))
    return [os.path.normpath(p) for p, _ in scan_folder(parent or ".", {name: 0}, IMAGE_SUFFIXES)]


def list_images(paths: Sequence[Union[str, Path]]) -> list[str]:
    """The image files named by ``paths``: a file as given (whatever its suffix; decoding says
    if it is no image), a folder as every image file under it. A missing path, or a folder with
    no image, is one ServingError."""
    found: list[str] = []
    if not paths:
        raise ServingError("no images given; name image files or folders")
    for given in paths:
        path = Path(given)
        if path.is_dir():
            images = _folder_images(path)
            if not images:
                raise ServingError(f"no image files ({', '.join(IMAGE_SUFFIXES[:5])}, ...) "
                                   f"under {path}")
            found += images
        elif path.is_file():
            found.append(str(path))
        else:
            raise ServingError(f"{path} does not exist; give image files or folders")
        if len(found) > MAX_IMAGES:
            raise ServingError(f"more than {MAX_IMAGES} images given; split the job")
    return found


def _load(paths: Iterable[str], model: ServingModel) -> np.ndarray:
    channels = int(model.info.data_config.input_size[0])
    return np.stack([model.transform(load_image(p, 1 if channels == 1 else 3)) for p in paths])


def predict(model: Union[ServingModel, str, Path], images: Sequence[Union[str, Path]], *,
            k: int = 5, batch_size: int = 16, threads: Optional[int] = None,
            progress: Optional[ProgressFn] = None) -> Predictions:
    """The top ``k`` classes (names from the file, probabilities by softmax) of every image in
    ``images`` (files, or folders searched for image files), preprocessed as the file's
    metadata says and run ``batch_size`` at a time. An image that cannot be read is one
    ServingError naming it (via the data error of :mod:`sbn_surgery.imaging`)."""
    if k < 1 or batch_size < 1:
        raise ServingError(f"--top-k and --batch-size must be at least 1; got {k} and {batch_size}")
    if not isinstance(model, ServingModel):
        model = ServingModel(model, threads)
    files = list_images(images)
    out = Predictions(str(model.path), model=model.info.to_json())
    done = 0
    for chunk in batched(files, batch_size):
        idx, probs = top_k(model.logits(_load(chunk, model)), k)
        for path, row, p in zip(chunk, idx, probs):
            out.predictions.append(Prediction(path, [int(i) for i in row],
                                              [model.classes[int(i)] for i in row],
                                              [float(v) for v in p]))
        done += len(chunk)
        if progress is not None:
            progress("predict", done, len(files))
    return out
