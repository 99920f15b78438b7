"""Accuracy of exported files on the data sources fine-tuning takes.

* :func:`validate_onnx`: top-1, top-5 and images/s of a file on a split, its images preprocessed
  as the file's metadata says (:mod:`sbn_surgery.serving`); with a checkpoint, the PyTorch
  model's accuracy on the same inputs and the top-1 agreement between the two.
* :func:`quantize_onnx`: an int8 file (onnxruntime static quantization, calibrated on training
  images through the file's own preprocessing) that replaces its target only once its top-1
  drop and agreement against the float file, on the validation split, are within bounds; a
  failing file is kept beside the target as ``NAME.int8-failed.onnx``.

Labelled images come from ``sbn_surgery.data`` (the built-in sources, ImageFolder, timm's data
sets), with the same split and ``subset`` as fine-tuning; an ImageFolder directory without
``subset`` is read without torch. torch is imported only for a checkpoint or a data source that
needs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from .errors import ServingError
from .files import staging_dir, write_error
from .progress import ProgressFn
from .serving import EvalReport, Samples, ServingModel, evaluate, labelled_folder
from .serving.quantize import QuantizeResult, quantize_file
from .serving.runtime import batched

__all__ = ["validate_onnx", "quantize_onnx", "open_samples", "DataSpec", "ValidateReport",
           "QuantizeReport", "QuantizeFailed"]

#: Seed of the calibration images' draw (fixed: the same images every time).
CALIBRATION_SEED = 20230629


@dataclass
class DataSpec:
    """A data source as ``finetune`` takes it."""

    source: str
    subset: Optional[int] = None
    dataset: Optional[str] = None
    train_split: Optional[str] = None
    val_split: Optional[str] = None


def _pil(image: np.ndarray):
    """A PIL image of a uint8 (C, h, w) array (C = 1 or 3)."""
    from PIL import Image

    return Image.fromarray(image[0], "L") if image.shape[0] == 1 else \
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")


def _split_items(loader, channels: int, order: Optional[list[int]], train: bool):
    """(PIL image, label) of a split of ``sbn_surgery.data``, in ``order`` (indices)."""
    from .data.shards import RawReader, epoch_stream
    from .data.sources import SPLIT_SEED, TensorSplit
    from .data.transforms import IndexedReader

    split = loader.split
    if isinstance(split, TensorSplit):
        images, labels = split.images.numpy(), split.labels.numpy()
        return lambda: ((_pil(images[i]), int(labels[i])) for i in order)
    if loader.streamed:
        read = RawReader(channels)

        def stream() -> Iterator:
            items = epoch_stream(split, seed=SPLIT_SEED, epoch=0, rank=0, world=1, train=train)
            for _, item in zip(range(len(order)), items):
                yield read(item)
        return stream
    read = IndexedReader(split, channels)
    return lambda: (read(i) for i in order)


def open_samples(spec: DataSpec, split: str, channels: int, data_config: dict,
                 limit: Optional[int] = None) -> Samples:
    """The labelled images of ``split`` ("train" or "val") of a data source, as fine-tuning
    splits it (``subset`` included). ``limit``: that many training images drawn at random (a
    fixed draw; the first of a shuffled pass for WebDataset shards); more than the split holds
    is an error."""
    mode = 1 if channels == 1 else 3
    root = Path(str(spec.source)).expanduser()
    if spec.dataset is None and spec.subset is None and root.is_dir():
        return labelled_folder(root / split, mode, limit, CALIBRATION_SEED)  # without torch
    from .data import build_loaders, open_source

    ds = open_source(spec.source, dataset=spec.dataset, train_split=spec.train_split,
                     val_split=spec.val_split)
    cfg = {**data_config, "input_size": tuple(data_config["input_size"])}
    train, val, _ = build_loaders(ds, cfg, 64, subset=spec.subset, augment=False)
    loader = train if split == "train" else val
    total = loader.total_samples
    count = total if limit is None else int(limit)
    if count > total:
        raise ServingError(f"the {split} split of {ds.name} holds {total} images, fewer than the "
                           f"{count} asked for; lower --calibration-images (or --subset less)")
    if limit is None:
        order = list(range(total))
    else:
        order = sorted(np.random.default_rng(CALIBRATION_SEED).permutation(total)[:count].tolist())
    items = _split_items(loader, mode, order, split == "train")
    return Samples(f"{ds.name} ({split})", list(ds.classes), count, items)


def checkpoint_logits(path: Union[str, Path]) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of the converted checkpoint ``path`` (PyTorch, eval mode, float32 on the CPU)."""
    import torch

    from .checkpoint import load_converted

    model = load_converted(path).float().eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(x)))
        return (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()

    return run


def _class_notes(model: ServingModel, samples: Samples) -> list[str]:
    """Refuse data whose class count is not the file's; note names that differ."""
    if len(samples.classes) != len(model.classes):
        raise ServingError(f"{model.path} has {len(model.classes)} outputs but {samples.name} "
                           f"has {len(samples.classes)} classes; validate a file on the data it "
                           "was fine-tuned on")
    if list(samples.classes) != list(model.classes):
        return [f"the file's class names ({model.info.classes_source}) differ from the data's; "
                "label i is scored against output i"]
    return []


@dataclass
class ValidateReport:
    """:func:`validate_onnx`'s result: the file's :class:`EvalReport` (``onnx``, and
    ``pytorch`` with a checkpoint) and the preprocessing used."""

    onnx: str
    data_config: dict[str, Any]
    report: EvalReport
    checkpoint: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        first = self.report["onnx"]
        out = {"onnx": self.onnx, "data": self.report.data, "images": self.report.images,
               "top1": first.top1, "top5": first.top5, "images_per_s": first.images_per_s,
               "wall_s": self.report.wall_s, "preprocessing": self.data_config,
               "notes": list(self.notes)}
        if self.checkpoint is not None:
            ref = self.report["pytorch"]
            out["checkpoint"] = {"path": self.checkpoint, "top1": ref.top1, "top5": ref.top5,
                                 "top1_agreement": ref.agreement,
                                 "top1_difference": first.top1 - ref.top1}
        return out


def validate_onnx(onnx_path: Union[str, Path], data: DataSpec, *,
                  checkpoint: Union[str, Path, None] = None, batch_size: int = 64,
                  threads: Optional[int] = None,
                  progress: Optional[ProgressFn] = None) -> ValidateReport:
    """Top-1/top-5 and images/s of ``onnx_path`` on the validation split of ``data``,
    preprocessed as the file's metadata says; with ``checkpoint``, the PyTorch model's
    accuracy on the same inputs and the top-1 agreement."""
    if batch_size < 1:
        raise ServingError(f"--batch-size must be at least 1; got {batch_size}")
    model = ServingModel(onnx_path, threads)
    cfg = model.info.data_config
    samples = open_samples(data, "val", cfg.input_size[0], cfg.to_json())
    notes = _class_notes(model, samples)
    models = {"onnx": model.logits}
    if checkpoint is not None:
        models["pytorch"] = checkpoint_logits(checkpoint)
    report = evaluate(models, samples, model.transform, batch_size=batch_size, progress=progress)
    return ValidateReport(str(onnx_path), cfg.to_json(), report,
                          None if checkpoint is None else str(checkpoint), notes)


@dataclass
class QuantizeReport:
    """:func:`quantize_onnx`'s result: the float and int8 files' scores on the validation split
    and the bounds they were held to (``max_top1_drop`` in points, ``min_agreement`` 0-1)."""

    onnx: str
    output: str
    quantized: QuantizeResult
    report: EvalReport
    max_top1_drop: float
    min_agreement: float

    @property
    def top1_drop(self) -> float:
        """Points of top-1 lost by the int8 file (negative: gained)."""
        return 100.0 * (self.report["float"].top1 - self.report["int8"].top1)

    @property
    def passed(self) -> bool:
        agreement = self.report["int8"].agreement or 0.0
        return self.top1_drop <= self.max_top1_drop and agreement >= self.min_agreement

    def to_json(self) -> dict[str, Any]:
        f, q = self.report["float"], self.report["int8"]
        return {"onnx": self.onnx, "output": self.output, "passed": self.passed,
                "data": self.report.data, "images": self.report.images,
                "float": f.to_json(), "int8": q.to_json(), "top1_drop_points": self.top1_drop,
                "top1_agreement": q.agreement, "max_top1_drop": self.max_top1_drop,
                "min_agreement": self.min_agreement, "quantization": self.quantized.to_json()}


class QuantizeFailed(ServingError):
    """The int8 file misses its bounds; it is kept beside the target."""

    def __init__(self, report: QuantizeReport, kept: Path) -> None:
        self.report = report
        self.kept = kept
        q = report.report["int8"]
        super().__init__(
            f"the int8 file misses its bounds: top-1 drop {report.top1_drop:.2f} points (allowed "
            f"{report.max_top1_drop:g}), top-1 agreement {100 * (q.agreement or 0):.1f} % "
            f"(required {100 * report.min_agreement:g} %). {report.output} was not written (a "
            f"file there is unchanged); the int8 file is kept at {kept}. Try more "
            "--calibration-images, or loosen --max-top1-drop/--min-agreement if the loss is "
            "acceptable")


def failed_path(output: Path) -> Path:
    """``NAME.int8-failed.onnx`` beside ``output`` (``NAME.int8.onnx`` or ``NAME.onnx``)."""
    stem = output.stem[:-5] if output.stem.endswith(".int8") else output.stem
    return output.with_name(f"{stem}.int8-failed.onnx")


def _check_quantize_options(src: Path, output: Path, images: int, max_drop: float,
                            min_agreement: float) -> None:
    if output.suffix.lower() != ".onnx" or output.is_dir():
        raise ServingError(f"-o {output}: give the .onnx file to write")
    if output.resolve() == src.resolve():
        raise ServingError(f"-o {output} is the float file itself; write the int8 file beside it")
    if images < 1:
        raise ServingError(f"--calibration-images must be at least 1; got {images}")
    if not (math.isfinite(max_drop) and max_drop >= 0):
        raise ServingError(f"--max-top1-drop must be a finite number of points >= 0; got {max_drop}")
    if not (math.isfinite(min_agreement) and 0 <= min_agreement <= 1):
        raise ServingError(f"--min-agreement must be in [0, 1]; got {min_agreement}")


def _calibration(samples: Samples, transform, progress: Optional[ProgressFn]) -> Iterator:
    done = 0
    for chunk in batched(samples.items(), 16):
        yield np.stack([transform(img) for img, _ in chunk])
        done += len(chunk)
        if progress is not None:
            progress("calibrate", done, samples.count)


def quantize_onnx(onnx_path: Union[str, Path], data: DataSpec, output: Union[str, Path], *,
                  calibration_images: int = 256, max_top1_drop: float = 1.0,
                  min_agreement: float = 0.98, batch_size: int = 64,
                  threads: Optional[int] = None,
                  progress: Optional[ProgressFn] = None) -> QuantizeReport:
    """Quantize ``onnx_path`` to int8 (see :mod:`sbn_surgery.serving.quantize`), calibrated on
    ``calibration_images`` training images of ``data`` preprocessed as the file says, then
    compare it with the float file on the validation split. It replaces ``output`` only if the
    top-1 drop is at most ``max_top1_drop`` points and the top-1 agreement at least
    ``min_agreement``; otherwise :class:`QuantizeFailed`, the file kept at
    ``NAME.int8-failed.onnx``."""
    src, output = Path(onnx_path), Path(output)
    _check_quantize_options(src, output, calibration_images, max_top1_drop, min_agreement)
    model = ServingModel(src, threads)
    cfg = model.info.data_config
    calib = open_samples(data, "train", cfg.input_size[0], cfg.to_json(), calibration_images)
    samples = open_samples(data, "val", cfg.input_size[0], cfg.to_json())
    _class_notes(model, samples)
    with staging_dir(output) as work:  # swept by the next write of output if this one dies
        staged = work / output.name
        result = quantize_file(src, staged, _calibration(calib, model.transform, progress),
                               calibration_images)
        int8 = ServingModel(staged, threads)
        report = evaluate({"float": model.logits, "int8": int8.logits}, samples, model.transform,
                          batch_size=batch_size, progress=progress, what="check")
        result.path = str(output)
        out = QuantizeReport(str(src), str(output), result, report, float(max_top1_drop),
                             float(min_agreement))
        if not out.passed:
            kept = failed_path(output)
            _publish(staged, kept)
            raise QuantizeFailed(out, kept)
        _publish(staged, output)
        return out


def _publish(staged: Path, path: Path) -> None:
    try:
        os.replace(staged, path)
    except OSError as exc:  # e.g. the folder made read-only meanwhile
        raise write_error(path, exc) from None
