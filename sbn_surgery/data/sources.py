"""Data sources: the built-in sets (digits, Fashion-MNIST, synthetic), ImageFolder dirs, and
timm's named data sets (WebDataset shards, tar archives, local Hugging Face datasets; see
:mod:`.timm_sources`).

Each is opened into a :class:`Dataset` with train and val splits: uint8 tensors at native size
for the built-ins, torchvision ``ImageFolder`` datasets for a directory, random-access readers
for tar archives and Hugging Face datasets, shard lists for WebDataset. The digits split and
``--subset`` use a fixed seed, so they are the same for every training seed.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from ..imaging import IMAGE_SUFFIXES
from .images import has_images, scan_folder

BUILTIN_SOURCES = ("digits", "fashion-mnist", "synthetic")
#: Where Fashion-MNIST's idx files are looked for, in order (the Debian package path first).
FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
#: Where torchvision's downloader puts Fashion-MNIST when no local copy exists.
FASHION_MNIST_CACHE = Path.home() / ".cache" / "sbn-surgery" / "fashion-mnist"
#: Fraction of the digits that is held out for validation (the set has no official split).
DIGITS_VAL_FRACTION = 0.2
#: Seed of the fixed train/val split and of ``--subset`` (independent of the training seed).
SPLIT_SEED = 20230629
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]

# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
@dataclass
class TensorSplit:
    """Images as uint8 (N, C, h, w) at native size, labels as int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def take(self, index: Tensor) -> "TensorSplit":
        return TensorSplit(self.images[index], self.labels[index])


@dataclass
class Dataset:
    """An opened data source: train and val splits (tensors, ImageFolder datasets, timm readers
    or WebDataset shard lists)."""

    name: str
    kind: str  # "tensor" | "folder" | "timm" (random access) | "wds" (shards, streamed)
    classes: list[str]
    train: Any
    val: Any
    hflip: bool = False  # whether a horizontal flip is a label-preserving augmentation

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def native_size(self) -> Optional[tuple[int, int]]:
        if self.kind == "tensor":
            return tuple(self.train.images.shape[-2:])  # type: ignore[return-value]
        return None


def _split_generator() -> torch.Generator:
    return torch.Generator().manual_seed(SPLIT_SEED)


def _stratified_split(labels: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Indices (train, val) with ``fraction`` of every class in val; fixed seed."""
    gen = _split_generator()
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = int(round(fraction * idx.numel()))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    full = TensorSplit(images, labels)
    tr, va = _stratified_split(labels, DIGITS_VAL_FRACTION)
    return Dataset("digits", "tensor", [str(i) for i in range(10)], full.take(tr), full.take(va))


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), plain or gzip-compressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}; reinstall the data set") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number); "
                        f"reinstall the data set")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    count = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != count:
        raise DataError(f"{path} holds {body.size} bytes of data, its header says {dims} "
                        f"({count}); the file is truncated, reinstall the data set")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_dir() -> Path:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    candidates = list(FASHION_MNIST_DIRS) + [FASHION_MNIST_CACHE / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(_find_idx(folder, s) is not None for s in stems):
            return folder
    try:  # torchvision's downloader, where a network exists
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(FASHION_MNIST_CACHE), train=True, download=True)
        FashionMNIST(str(FASHION_MNIST_CACHE), train=False, download=True)
    except Exception as exc:  # no network, no space, ...: one clear line
        raise DataError(
            f"Fashion-MNIST not found in {', '.join(str(c) for c in candidates)} and the download "
            f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"install it with `apt-get install dataset-fashion-mnist`, or use --data digits"
        ) from exc
    return FASHION_MNIST_CACHE / "FashionMNIST" / "raw"


def _load_fashion_mnist() -> Dataset:
    folder = _fashion_dir()

    def split(prefix: str) -> TensorSplit:
        images = _read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {prefix} files in {folder} disagree: images "
                            f"{images.shape}, labels {labels.shape}; reinstall the data set")
        return TensorSplit(torch.from_numpy(images.copy()).unsqueeze(1),
                           torch.from_numpy(labels.astype(np.int64)))

    return Dataset("fashion-mnist", "tensor", list(FASHION_MNIST_CLASSES), split("train"),
                   split("t10k"), hflip=True)


def _make_synthetic(num_classes: int = 10, n_train: int = 640, n_val: int = 160,
                    size: int = 32) -> Dataset:
    """Smooth random class patterns plus noise: learnable in a few steps, no files needed."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    protos = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=gen), size=(size, size),
                           mode="bilinear", align_corners=False)

    def split(n: int) -> TensorSplit:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        x = torch.sigmoid(1.5 * protos[labels] + 0.7 * torch.randn(n, 3, size, size, generator=gen))
        return TensorSplit((x * 255).round().to(torch.uint8), labels)

    return Dataset("synthetic", "tensor", [f"class{i}" for i in range(num_classes)],
                   split(n_train), split(n_val))


def _has_images(folder: Path) -> bool:
    return has_images(folder, IMAGE_SUFFIXES)


def _image_folder(path: Path):
    """torchvision's ImageFolder over :func:`scan_folder`: symbolic links are followed once per
    real path (a link loop adds nothing), and a class folder without images is an error."""
    from torchvision.datasets import ImageFolder

    class _Folder(ImageFolder):
        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                         allow_empty=False):
            return scan_folder(str(directory), class_to_idx, IMAGE_SUFFIXES)

    folder = _Folder(str(path), allow_empty=True)
    counts = np.bincount([t for _, t in folder.samples], minlength=len(folder.classes))
    empty = [c for c, n in zip(folder.classes, counts) if n == 0]
    if empty:
        raise DataError(f"{len(empty)} class folder(s) under {path} hold no images (e.g. "
                        f"{', '.join(empty[:5])}); remove them or add images")
    return folder


def _load_folder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"data path {root} is a file; give a directory with train/ and val/ "
                        f"sub-folders in ImageFolder layout (train/<class>/<image>)")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())[:8]
        raise DataError(
            f"data directory {root} has no {' and no '.join(m + '/' for m in missing)} "
            f"sub-folder (found: {', '.join(found) or 'no sub-folders'}); an ImageFolder data set "
            f"needs {root}/train/<class>/<image> and {root}/val/<class>/<image>"
        )
    splits = {}
    for s in ("train", "val"):
        if not _has_images(root / s):
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES[:5])}, ...) under {root / s}; "
                            f"put one sub-folder per class there, with the images inside")
        try:
            splits[s] = _image_folder(root / s)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"{root / s} is not in ImageFolder layout: {exc}; put the images in "
                            f"one sub-folder per class") from exc
    if splits["train"].classes != splits["val"].classes:
        a, b = set(splits["train"].classes), set(splits["val"].classes)
        raise DataError(
            f"class folders differ between {root}/train and {root}/val: only in train: "
            f"{sorted(a - b)[:5]}, only in val: {sorted(b - a)[:5]}; both need the same classes"
        )
    return Dataset(str(root), "folder", list(splits["train"].classes), splits["train"],
                   splits["val"], hflip=True)


def open_source(source: Union[str, Path], *, dataset: Optional[str] = None,
                train_split: Optional[str] = None, val_split: Optional[str] = None) -> Dataset:
    """Open a data source: ``digits``, ``fashion-mnist``, ``synthetic`` or an ImageFolder dir;
    with ``dataset`` (timm's ``--dataset`` names: ``wds/NAME``, ``hfds/NAME``, ``tar``,
    ``folder``, ``imagefolder``), ``source`` is its root and the splits are timm's
    (default ``train`` and ``validation``), see :mod:`.timm_sources`."""
    if dataset is not None and str(dataset).strip():
        from .timm_sources import open_timm

        parts = open_timm(str(source), str(dataset).strip(), train_split, val_split)
        return Dataset(parts["name"], parts["kind"], parts["classes"], parts["train"],
                       parts["val"], hflip=True)
    if train_split is not None or val_split is not None:
        raise DataError("--train-split/--val-split name the splits of a --dataset (e.g. "
                        "--dataset wds/imagenet); the built-in sources and an ImageFolder "
                        "directory have their own train/val splits")
    name = str(source)
    if name == "digits":
        return _load_digits()
    if name in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _load_fashion_mnist()
    if name == "synthetic":
        return _make_synthetic()
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {name!r} does not exist: it is neither a built-in source "
            f"({', '.join(BUILTIN_SOURCES)}) nor an existing directory; give a directory with "
            f"train/ and val/ in ImageFolder layout, or --data digits"
        )
    return _load_folder(path)


def _subset_indices(n: int, k: Optional[int], what: str) -> Optional[Tensor]:
    if k is None or k >= n:
        return None
    if k < 1:
        raise DataError(f"--subset must be at least 1; got {k} for the {what} split")
    gen = torch.Generator().manual_seed(SPLIT_SEED + 1)
    return torch.randperm(n, generator=gen)[:k].sort().values


def _apply_subset(ds: Dataset, subset: Optional[int]) -> Dataset:
    if subset is None:
        return ds
    if subset < 2:
        raise DataError(f"--subset {subset} is too small to train on; use at least 2 images")
    n_val = max(1, subset // 5)

    def cut(split: Any, k: int, what: str) -> Any:
        idx = _subset_indices(len(split), k, what)
        if idx is None:
            return split
        if isinstance(split, TensorSplit):
            return split.take(idx)
        if hasattr(split, "take_first"):  # shards are streamed: the first k in file order
            return split.take_first(k)
        return torch.utils.data.Subset(split, idx.tolist())

    return Dataset(ds.name, ds.kind, ds.classes, cut(ds.train, subset, "train"),
                   cut(ds.val, n_val, "val"), ds.hflip)


def is_builtin(source: Union[str, Path]) -> bool:
    return str(source) in ("digits", "fashion-mnist", "fashion_mnist", "fashionmnist", "synthetic")
