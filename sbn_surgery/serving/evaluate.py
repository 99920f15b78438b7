"""Accuracy on labelled images: top-1, top-5 and speed of one or more models run on the same
preprocessed batches, and how often each agrees with the first on the top-1 class.

A model here is a function from a float32 batch (N, C, H, W) to logits (N, classes): an
onnxruntime session (:meth:`ServingModel.logits`), or anything else, e.g. the PyTorch model a
file was exported from, wrapped by the caller. Labelled images come from
:func:`labelled_folder` (torch-free) or from the data sources (``sbn_surgery.accuracy``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from ..errors import ServingError
from ..imaging import IMAGE_SUFFIXES, has_images, load_image, scan_folder
from ..progress import ProgressFn
from .runtime import batched

__all__ = ["Score", "EvalReport", "evaluate", "labelled_folder", "Samples"]

Logits = Callable[[np.ndarray], np.ndarray]


@dataclass
class Samples:
    """Labelled images: ``classes`` (the name of each label), ``count`` and ``items()``, an
    iterator of (PIL image, label) in a fixed order."""

    name: str
    classes: list[str]
    count: int
    items: Callable[[], Iterator[tuple[Any, int]]]


def labelled_folder(root: Union[str, Path], channels: int = 3, limit: Optional[int] = None,
                    seed: int = 0) -> Samples:
    """The images of an ImageFolder split (``root/<class>/<image>``, classes sorted by name as
    torchvision's ImageFolder sorts them), read without torch; ``limit``: that many drawn at
    random (numpy, ``seed``), more than the folder holds being an error."""
    root = Path(root)
    if not root.is_dir():
        raise ServingError(f"{root} is not a folder; give a folder with one sub-folder per class")
    classes = sorted(e.name for e in root.iterdir() if e.is_dir())
    if not classes or not has_images(root, IMAGE_SUFFIXES):
        raise ServingError(f"no class folders with images under {root}; an ImageFolder split "
                           f"holds {root}/<class>/<image>")
    samples = scan_folder(str(root), {c: i for i, c in enumerate(classes)}, IMAGE_SUFFIXES)
    if limit is not None:
        if limit > len(samples):
            raise ServingError(f"{root} holds {len(samples)} images, fewer than the {limit} "
                               "asked for; lower --calibration-images")
        pick = np.random.default_rng(seed).permutation(len(samples))[:limit]
        samples = [samples[i] for i in sorted(pick.tolist())]
    mode = 1 if channels == 1 else 3

    def items() -> Iterator[tuple[Any, int]]:
        for path, label in samples:
            yield load_image(path, mode), label

    return Samples(str(root), classes, len(samples), items)


@dataclass
class Score:
    """One model's accuracy on the images: fractions in [0, 1]; top-5 None with 5 classes or
    fewer (as fine-tuning reports it); ``agreement``: the share of images whose top-1 class is
    the first model's (None for the first model itself); ``images_per_s``: inference alone."""

    name: str
    top1: float
    top5: Optional[float]
    images_per_s: float
    agreement: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "images_per_s": self.images_per_s,
                "top1_agreement": self.agreement}


@dataclass
class EvalReport:
    """:func:`evaluate`'s result: one :class:`Score` per model, in the order given."""

    data: str
    images: int
    scores: list[Score] = field(default_factory=list)
    wall_s: float = 0.0

    def __getitem__(self, name: str) -> Score:
        return next(s for s in self.scores if s.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "images": self.images, "wall_s": self.wall_s,
                **{s.name: s.to_json() for s in self.scores}}


def evaluate(models: dict[str, Logits], samples: Samples, transform: Callable[[Any], np.ndarray],
             *, batch_size: int = 64, progress: Optional[ProgressFn] = None,
             what: str = "validate") -> EvalReport:
    """Run every model in ``models`` on the same batches of ``samples`` preprocessed by
    ``transform`` and count top-1 and top-5 hits and top-1 agreement with the first model."""
    if not models:
        raise ServingError("evaluate needs at least one model")
    if samples.count < 1:
        raise ServingError(f"{samples.name} holds no images to evaluate on")
    names = list(models)
    k = 5 if len(samples.classes) > 5 else 1
    hits1, hits5, agree = (dict.fromkeys(names, 0) for _ in range(3))
    secs = dict.fromkeys(names, 0.0)
    seen = 0
    t0 = time.perf_counter()
    for chunk in batched(samples.items(), batch_size):
        x = np.stack([transform(img) for img, _ in chunk])
        y = np.asarray([label for _, label in chunk])
        first = None
        for name in names:
            t = time.perf_counter()
            logits = np.asarray(models[name](x))
            secs[name] += time.perf_counter() - t
            if logits.ndim != 2 or logits.shape[0] != len(x) or logits.shape[1] <= int(y.max()):
                raise ServingError(f"{name} gives outputs of shape {logits.shape} for "
                                   f"{len(x)} images of {len(samples.classes)} classes; is it "
                                   "the model of this data set?")
            order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            hits1[name] += int((order[:, 0] == y).sum())
            hits5[name] += int((order == y[:, None]).any(1).sum())
            first = order[:, 0] if first is None else first
            agree[name] += int((order[:, 0] == first).sum())
        seen += len(chunk)
        if progress is not None:
            progress(what, seen, samples.count)
    report = EvalReport(samples.name, seen, wall_s=time.perf_counter() - t0)
    for i, name in enumerate(names):
        report.scores.append(Score(name, hits1[name] / seen, hits5[name] / seen if k == 5 else None,
                                   seen / max(secs[name], 1e-9),
                                   None if i == 0 else agree[name] / seen))
    return report
