"""Datasets and loaders for fine-tuning: the embedded default, Fashion-MNIST, ImageFolder, synthetic.

Sources (the ``--data`` argument):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes); offline
  anywhere. A fixed, class-stratified 80/20 split gives train and val.
* ``fashion-mnist``: the idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), else torchvision's downloader where a network exists.
  Train is the 60000-image training set, val the 10000-image test set.
* a directory in ImageFolder layout with ``train/`` and ``val/`` (one sub-folder per class).
* ``synthetic``: 10 classes of smooth random patterns plus noise, 3x32x32, for tests.

Preprocessing comes from timm's data config for the model (``resolve_data_config``): images are
resized to its input size, normalized with its mean and std, and grayscale images are repeated to
the model's channel count. The built-in sources live in memory as uint8 tensors at their native
size and are preprocessed a batch at a time (one interpolate, one normalize), so a CPU epoch
spends its time in the model. ImageFolder images go through timm's own transforms, per image.

Training augmentation (``augment``; by default on for an ImageFolder, off for the built-in
sources) is timm's training transform for an ImageFolder, and a random shift of up to 1/8 of the
size plus, where label-preserving, a horizontal flip for the in-memory sources.

Every random choice is a function of (seed, epoch, rank, batch): the shuffle order comes from a
``DistributedSampler`` (also with one process), and the augmentation of each batch (or image)
uses its own generator. An epoch can therefore be replayed exactly, also from the middle, which
is what ``--resume`` relies on. ``--subset N`` always picks the same N training images (and N/5
validation images), whatever the seed.
"""

from __future__ import annotations

import gzip
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

__all__ = [
    "BUILTIN_SOURCES",
    "FASHION_MNIST_DIRS",
    "SMALL_IMAGE_SIZE",
    "Dataset",
    "Loader",
    "build_loaders",
    "calibration_batches",
    "data_config_for",
    "open_source",
]

BUILTIN_SOURCES = ("digits", "fashion-mnist", "synthetic")
#: Where Fashion-MNIST's idx files are looked for, in order (the Debian package path first).
FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
#: Where torchvision's downloader puts Fashion-MNIST when no local copy exists.
FASHION_MNIST_CACHE = Path.home() / ".cache" / "sbn-surgery" / "fashion-mnist"
#: Default input size (H = W) for the built-in sources, whose native images are 8x8 to 32x32:
#: big enough for a ResNet's five stride-2 stages, small enough for a CPU.
SMALL_IMAGE_SIZE = 64
#: Fraction of the digits that is held out for validation (the set has no official split).
DIGITS_VAL_FRACTION = 0.2
#: Seed of the fixed train/val split and of ``--subset`` (independent of the training seed).
SPLIT_SEED = 20230629
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    """An opened data source: train and val splits (tensors, or ImageFolder datasets)."""

    name: str
    kind: str  # "tensor" | "folder"
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
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file())


def _load_folder(root: Path) -> Dataset:
    from torchvision.datasets import ImageFolder

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
            splits[s] = ImageFolder(str(root / s))
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


def open_source(source: Union[str, Path]) -> Dataset:
    """Open a data source: ``digits``, ``fashion-mnist``, ``synthetic`` or an ImageFolder dir."""
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
        return torch.utils.data.Subset(split, idx.tolist())

    return Dataset(ds.name, ds.kind, ds.classes, cut(ds.train, subset, "train"),
                   cut(ds.val, n_val, "val"), ds.hflip)


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def data_config_for(model: torch.nn.Module, input_size: Optional[Sequence[int]] = None,
                    in_chans: Optional[int] = None) -> dict:
    """timm's data config for ``model`` (resize, interpolation, mean, std), at ``input_size``
    ((C, H, W) or (H, W)) when given; the channel count follows the model's ``in_chans``."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if len(size) == 2:
            size = (in_chans or 3,) + size
        if len(size) != 3 or min(size) < 1:
            raise DataError(f"--input-size expects C H W (e.g. 3 64 64); got {list(input_size)}")
        args["input_size"] = size
    cfg = dict(resolve_data_config(args, model=model))
    if in_chans is not None and cfg["input_size"][0] != in_chans:
        cfg["input_size"] = (in_chans,) + tuple(cfg["input_size"][1:])
    return _fit_channels(cfg)


def _fit_channels(cfg: dict) -> dict:
    """Mean/std with one entry per input channel (timm keeps 3 for a 1-channel model)."""
    cfg = dict(cfg)
    c = int(cfg["input_size"][0])
    for key, fill in (("mean", 0.5), ("std", 0.5)):
        v = tuple(float(t) for t in cfg.get(key, (fill,) * c))
        if len(v) != c:
            v = (sum(v) / len(v),) * c
        cfg[key] = v
    return cfg


def _prepare(images: Tensor, cfg: dict, gen: Optional[torch.Generator] = None,
             hflip: bool = False) -> Tensor:
    """uint8 (B, c, h, w) -> normalized float (B, C, H, W) at the config's size; with ``gen``,
    a random shift of up to 1/8 of the size (zero fill) and, if ``hflip``, a random flip."""
    c, h, w = (int(v) for v in cfg["input_size"])
    x = images.float().div_(255.0)
    if tuple(x.shape[-2:]) != (h, w):
        mode = "bicubic" if cfg.get("interpolation", "bilinear") == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    if gen is not None:
        x = _shift_flip(x, gen, hflip)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:  # RGB to luminance (ITU-R 601), as PIL's convert("L")
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataError(f"images have {x.shape[1]} channels, the model expects {c}")
    mean = torch.tensor(cfg["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _shift_flip(x: Tensor, gen: torch.Generator, hflip: bool) -> Tensor:
    """Per-image integer translation (up to 1/8 of each side, zero fill) and optional h-flip."""
    b, _, h, w = x.shape
    max_dy, max_dx = h // 8, w // 8
    dy = torch.randint(-max_dy, max_dy + 1, (b,), generator=gen)
    dx = torch.randint(-max_dx, max_dx + 1, (b,), generator=gen)
    flip = (torch.rand(b, generator=gen) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    rows = torch.arange(h).view(1, h) - dy.view(b, 1)  # source row of each output row
    cols = torch.arange(w).view(1, w) - dx.view(b, 1)
    cols = torch.where(flip.view(b, 1), (w - 1) - cols, cols)
    valid = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
    ri = rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, x.shape[1], h, w)
    ci = cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = x.gather(2, ri).gather(3, ci)
    return out.masked_fill_(~valid, 0.0)


def _seed_of(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2,
               dtype=np.uint64)[0] >> 1)


class _SeededFolder(torch.utils.data.Dataset):
    """ImageFolder samples keyed by (index, seed): the transform's randomness comes from the seed
    (python ``random`` and torch, saved and restored around it), so any image is reproducible."""

    def __init__(self, folder: Any, transform: Any, channels: int) -> None:
        self.folder = folder
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, Optional[int]]):
        idx, seed = key
        base = self.folder
        if isinstance(base, torch.utils.data.Subset):
            idx, base = base.indices[idx], base.dataset
        path, label = base.samples[idx]
        img = base.loader(path)
        img = img.convert("L" if self.channels == 1 else "RGB")
        if seed is None:
            return self.transform(img), label
        t_state, p_state = torch.get_rng_state(), random.getstate()
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return self.transform(img), label
        finally:
            torch.set_rng_state(t_state)
            random.setstate(p_state)


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------
class Loader:
    """Batches of one split for one process: ``iter_epoch(epoch, start)`` yields (images, labels).

    Training loaders shuffle with ``DistributedSampler`` (seed + epoch; with several processes
    each rank gets its shard, padded so every rank runs the same number of batches) and, if
    ``augment``, augment.
    Validation loaders keep the order and split it between ranks without padding.
    ``set_epoch`` + ``iter`` gives the DataLoader-style interface.
    """

    def __init__(self, ds: Dataset, split: Any, cfg: dict, batch_size: int, *, train: bool,
                 seed: int = 0, rank: int = 0, world: int = 1, workers: int = 0,
                 augment: Optional[bool] = None) -> None:
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1; got {batch_size}")
        self.dataset = ds
        self.split = split
        self.data_config = cfg
        self.batch_size = int(batch_size)
        self.train = train
        self.augment = train and (default_augment(ds) if augment is None else bool(augment))
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.workers = int(workers)
        self.epoch = 0
        self.classes = ds.classes
        self._folder = None
        if ds.kind == "folder":
            self._folder = _SeededFolder(split, self._folder_transform(), int(cfg["input_size"][0]))

    def _folder_transform(self):
        from timm.data import create_transform

        cfg = self.data_config
        return create_transform(
            cfg["input_size"], is_training=self.augment, interpolation=cfg["interpolation"],
            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg.get("crop_pct"),
            crop_mode=cfg.get("crop_mode"),
        )

    @property
    def total_samples(self) -> int:
        """Images in the split (all ranks together, without padding)."""
        return len(self.split)

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample order for ``epoch``."""
        n = len(self.split)
        if self.train:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            return list(sampler)
        return list(range(self.rank, n, self.world))

    def _batches(self, epoch: int) -> list[list[int]]:
        order = self.indices(epoch)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.train and batches and len(batches[-1]) < 2 and len(batches) > 1:
            batches.pop()  # a batch of one has no batch statistics
        return batches

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def num_images(self, epoch: Optional[int] = None) -> int:
        """Images this rank sees in one epoch."""
        return sum(len(b) for b in self._batches(self.epoch if epoch is None else epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start``, ``start + 1``, ... of ``epoch``; the same batches every time."""
        batches = self._batches(epoch)
        if self._folder is not None:
            yield from self._iter_folder(batches, epoch, start)
            return
        split: TensorSplit = self.split
        for b in range(start, len(batches)):
            idx = torch.tensor(batches[b], dtype=torch.long)
            gen = None
            if self.augment:
                gen = torch.Generator().manual_seed(_seed_of(self.seed, epoch, self.rank, b))
            x = _prepare(split.images[idx], self.data_config, gen, self.dataset.hflip)
            yield x, split.labels[idx]

    def _iter_folder(self, batches, epoch, start):
        keyed = []
        for b in range(start, len(batches)):
            keyed.append([(i, _seed_of(self.seed, epoch, self.rank, b, j) if self.augment else None)
                          for j, i in enumerate(batches[b])])
        if not keyed:
            return
        loader = torch.utils.data.DataLoader(self._folder, batch_sampler=keyed,
                                             num_workers=self.workers,
                                             persistent_workers=False)
        for x, y in loader:
            yield x, y


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed=True needs an initialized process group (torchrun)")
    return dist.get_rank(), dist.get_world_size()


def default_augment(ds: Dataset) -> bool:
    """Training augmentation by default: on for an ImageFolder (timm's training transform), off
    for the built-in in-memory sources, whose small centered images are learnt fastest as they
    are in the few epochs one runs on them (resnet18, fashion-mnist, 5000 images, 3 epochs:
    88 % val top-1 without, 80 % with shifts and flips)."""
    return ds.kind == "folder"


def build_loaders(source: Union[str, Path, Dataset], data_config: dict, batch_size: int, *,
                  subset: Optional[int] = None, seed: int = 0, workers: int = 0,
                  distributed: bool = False,
                  augment: Optional[bool] = None) -> tuple[Loader, Loader, int]:
    """(train loader, val loader, number of classes) for ``source`` preprocessed per
    ``data_config`` (timm's: input_size, interpolation, mean, std, crop_pct). ``augment``
    (training only): None for :func:`default_augment`; ImageFolder images get timm's training
    transform, in-memory ones a random shift of up to 1/8 and, where label-preserving, a flip."""
    ds = source if isinstance(source, Dataset) else open_source(source)
    ds = _apply_subset(ds, subset)
    cfg = _fit_channels(data_config)
    rank, world = _dist_info(distributed)
    common = dict(seed=seed, rank=rank, world=world, workers=workers)
    train = Loader(ds, ds.train, cfg, batch_size, train=True, augment=augment, **common)
    val = Loader(ds, ds.val, cfg, batch_size, train=False, **common)
    if len(ds.train) < 2:
        raise DataError(f"the training split of {ds.name} has {len(ds.train)} image(s); need 2+")
    return train, val, ds.num_classes


def calibration_batches(source: Union[str, Path, Dataset], data_config: dict, batch_size: int,
                        num_batches: int) -> list[Tensor]:
    """``num_batches`` batches of preprocessed training images (eval preprocessing, a fixed
    shuffle), e.g. to calibrate SBN statistics on real data."""
    ds = source if isinstance(source, Dataset) else open_source(source)
    order = torch.randperm(len(ds.train), generator=_split_generator())
    order = order[: batch_size * max(0, int(num_batches))]
    if ds.kind == "tensor":
        picked = ds.train.take(order)
    else:
        picked = torch.utils.data.Subset(ds.train, order.tolist())
    loader = Loader(ds, picked, _fit_channels(data_config), batch_size, train=False)
    return [x for x, _ in loader.iter_epoch(0)]


def default_input_size(ds_or_source: Union[str, Path, Dataset], model_size: Sequence[int],
                       in_chans: int = 3) -> tuple[int, int, int]:
    """The input size finetune uses when none is given: ``SMALL_IMAGE_SIZE`` for the built-in
    sources (native 8x8 to 32x32 images), the model's own size for an ImageFolder."""
    name = ds_or_source.name if isinstance(ds_or_source, Dataset) else str(ds_or_source)
    if name in ("digits", "fashion-mnist", "fashion_mnist", "fashionmnist", "synthetic"):
        return (in_chans, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)
    size = tuple(int(v) for v in model_size)
    return (in_chans,) + size[-2:]  # type: ignore[return-value]


def is_builtin(source: Union[str, Path]) -> bool:
    return str(source) in ("digits", "fashion-mnist", "fashion_mnist", "fashionmnist", "synthetic")

