"""Data sets through timm's dataset factory (``timm.data.create_dataset``), named as timm's
``--dataset`` names them, with timm's ``--train-split`` / ``--val-split`` conventions:

* ``wds/NAME``: WebDataset tar shards under the source (a folder or URL root). A split is a name
  listed in the root's ``_info.json`` (with its file names, shard lengths and sample count) or a
  brace pattern such as ``train-{000000..000003}.tar``, with ``|N`` appended (N samples) where no
  info file gives the count. The number of classes is ``num_classes`` in the info file, else one
  pass over the validation labels. Needs the ``webdataset`` package. See :mod:`.shards`.
* ``hfds/NAME``: a Hugging Face dataset on local disk, never downloaded: the directory
  ``SOURCE/NAME``, else ``SOURCE``, holding data files ``datasets.load_dataset`` reads (parquet,
  arrow, ...), read through timm's ``hfds`` reader, or a ``save_to_disk`` folder. Images come from
  the ``image`` column, labels from ``label`` (a ``ClassLabel`` gives the class names). Needs the
  ``datasets`` package.
* ``tar``: timm's ImageDataset over a tar archive per split, ``SOURCE/SPLIT.tar``, with one
  folder per class inside (or one tar per class inside).
* ``folder`` / ``imagefolder``: ``SOURCE/SPLIT/<class>/<image>``, read as a ``--data DIR`` is
  (symbolic links followed once, any PIL mode, one error per unreadable image).

Split names are searched as timm's ``create_dataset`` searches them: the name itself, then its
synonyms (``train``/``training``; ``validation``/``val``/``valid``/``eval``/``evaluation``).
Defaults are timm's: ``train`` and ``validation``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import DataError
from .shards import WdsSplit, member_error, missing_local, scan_labels, unsafe_member

__all__ = ["TIMM_DATASETS", "open_timm", "search_split"]

#: The ``--dataset`` names this module opens (``wds/`` and ``hfds/`` take a NAME after them).
TIMM_DATASETS = ("wds/NAME", "hfds/NAME", "tar", "folder", "imagefolder")
DEFAULT_TRAIN_SPLIT, DEFAULT_VAL_SPLIT = "train", "validation"
_TRAIN_SYNONYMS = ("train", "training")
_EVAL_SYNONYMS = ("validation", "val", "valid", "eval", "evaluation")


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Keep timm's and datasets' log lines (an info file not found, progress) off the user's
    terminal: the library never prints, and errors come back as DataErrors."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets draws progress bars on stderr while it prepares a split: off for the block."""
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with _quiet("datasets"):
            yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _require(module: str, what: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataError(f"--dataset {what} needs the {module} package, which is not installed; "
                        f"`pip install {install}`")


def search_split(root: Path, split: str, suffixes: tuple[str, ...] = ("",)) -> Optional[Path]:
    """``root/split`` (with one of ``suffixes``), else the first synonym of ``split`` that
    exists, as timm's ``create_dataset`` looks for a split folder; None if none exists."""
    name = split.split("[")[0]
    names = [name]
    for group in (_TRAIN_SYNONYMS, _EVAL_SYNONYMS):
        if name in group:
            names += [s for s in group if s != name]
    for n in names:
        for suffix in suffixes:
            if (root / (n + suffix)).exists():
                return root / (n + suffix)
    return None


# --------------------------------------------------------------------------------------------
# random-access splits: tar archives and Hugging Face datasets
# --------------------------------------------------------------------------------------------
class ReaderSplit:
    """A random-access split over a timm reader (``reader[i]`` is (file object, label)):
    ``load(i, channels)`` decodes image ``i`` as the project decodes every image file."""

    def __init__(self, reader: Any, labels: np.ndarray, where: str) -> None:
        self.reader = reader
        self.labels = np.asarray(labels, dtype=np.int64)
        self.where = where

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, channels: int):
        from .images import decode_image

        try:
            f, label = self.reader[index][:2]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot read sample {index} of {self.where}: {exc}") from None
        try:
            return decode_image(f, f"{self.where} sample {index}", channels), int(label)
        finally:
            if hasattr(f, "close"):
                f.close()


class _HfDiskReader:
    """``reader[i]`` of a ``save_to_disk`` Hugging Face dataset, as timm's hfds reader gives it."""

    def __init__(self, hf: Any, image_key: str = "image", label_key: str = "label") -> None:
        self.dataset, self.image_key, self.label_key = hf, image_key, label_key

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image = item[self.image_key]
        if image.get("bytes"):
            return io.BytesIO(image["bytes"]), item[self.label_key]
        return open(image["path"], "rb"), item[self.label_key]


def _check_labels(splits: dict, num_classes: int, where: str) -> None:
    for role, split in splits.items():
        labels = split.labels
        if len(labels) == 0:
            raise DataError(f"the {role} split of {where} holds no images; check --{role}-split "
                            f"and the data")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise DataError(f"the {role} split of {where} has labels outside 0..{num_classes - 1} "
                            f"(e.g. {int(bad[0])}); fix the labels or the class list")


def _hf_dir(source: Path, name: str) -> Path:
    for cand in ((source / name) if name else None, source):
        if cand is not None and cand.is_dir():
            return cand
    raise DataError(f"no local Hugging Face dataset at {source / name if name else source}: "
                    f"hfds/ reads a directory on disk (parquet/arrow files, or a save_to_disk "
                    f"folder) and never downloads; save the dataset there first")


def _hf_split(path: Path, split: str, saved: Any):
    """(reader, labels, class names or None) of one split of the dataset at ``path``."""
    import datasets

    if saved is not None:
        names = list(saved.keys()) if isinstance(saved, datasets.DatasetDict) else []
        if not names:
            raise DataError(f"{path} holds one saved Dataset without splits; save a "
                            f"DatasetDict with {DEFAULT_TRAIN_SPLIT} and {DEFAULT_VAL_SPLIT}")
        if split not in names:
            raise DataError(f"split {split!r} not in the Hugging Face dataset at {path} "
                            f"(it has {names}); pass --train-split/--val-split")
        hf = saved[split].cast_column("image", datasets.Image(decode=False))
        reader = _HfDiskReader(hf)
    else:
        from timm.data.readers.reader_hfds import ReaderHfds

        try:  # timm's reader itself: its factories lower-case the name (the path) before 1.0.2x
            with _no_progress_bars():
                reader = ReaderHfds(name=str(path), root=None, split=split)
        except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
            raise DataError(f"cannot load split {split!r} of the Hugging Face dataset at {path}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                            f"pass --train-split/--val-split with a split it has") from None
        hf = reader.dataset
    label_key = getattr(reader, "label_key", "label")
    feature = hf.features.get(label_key)
    names = list(feature.names) if hasattr(feature, "names") else None
    return reader, np.asarray(hf.with_format("numpy")[label_key]), names


def _open_hfds(source: Path, name: str, train_split: str, val_split: str) -> dict:
    _require("datasets", "hfds/", "'sbn-surgery[hfds]'")
    path = _hf_dir(source, name)
    saved = None
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        saved = datasets.load_from_disk(str(path))
    splits, names = {}, None
    for role, split in (("train", train_split), ("val", val_split)):
        reader, labels, names = _hf_split(path, split, saved)
        splits[role] = ReaderSplit(reader, labels, f"{path} [{split}]")
    num = len(names) if names else 1 + int(max(s.labels.max(initial=-1) for s in splits.values()))
    _check_labels(splits, num, str(path))
    classes = names or [str(i) for i in range(num)]
    return dict(name=str(path), classes=classes, train=splits["train"], val=splits["val"],
                kind="timm")


def _open_tar(source: Path, train_split: str, val_split: str) -> dict:
    from timm.data import create_dataset

    splits, classes = {}, {}
    for role, split in (("train", train_split), ("val", val_split)):
        root = search_split(source, split.removesuffix(".tar"), (".tar",))
        if root is None or not root.is_file():
            raise DataError(f"no {split}.tar (or a synonym) under {source}; the tar data set "
                            f"needs {source}/{split}.tar with one folder per class inside")
        try:  # tar handles are opened per image: loader workers never share one
            ds = create_dataset("", root=str(root), split=split, search_split=False,
                                cache_tarfiles=False)
        except (AssertionError, ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read the tar archive(s) at {root}: {exc or type(exc).__name__}"
                            f"; write them again (tar with one folder per class)") from None
        reader = ds.reader
        _check_member_names(reader, root)
        splits[role] = ReaderSplit(reader, reader.targets, str(root))
        classes[role] = sorted(reader.class_name_to_idx, key=reader.class_name_to_idx.get)
    if classes["train"] != classes["val"]:
        raise DataError(f"the classes of {train_split} and {val_split} under {source} differ "
                        f"({classes['train'][:5]} vs {classes['val'][:5]}); both need the same")
    _check_labels(splits, len(classes["train"]), str(source))
    return dict(name=str(source), classes=classes["train"], train=splits["train"],
                val=splits["val"], kind="timm")


def _check_member_names(reader: Any, root: Path) -> None:
    """Refuse a member (an image, or a tar inside the tar) whose name has a ``..`` component
    or starts with ``/``: timm would make its folder a class (``..``, ``tmp``)."""
    for sample in reader.samples:
        for info in (sample[0], sample[2]):  # the image's TarInfo, the inner tar's (or None)
            name = getattr(info, "name", None)
            if isinstance(name, str) and unsafe_member(name):
                raise member_error(name, str(root))


def _open_folder(source: Path, train_split: str, val_split: str) -> dict:
    from .sources import IMAGE_SUFFIXES, _image_folder
    from .images import has_images

    splits = {}
    for role, split in (("train", train_split), ("val", val_split)):
        root = search_split(source, split)
        if root is None or not root.is_dir():
            raise DataError(f"no folder {split}/ (or a synonym) under {source}; an image folder "
                            f"data set needs {source}/{split}/<class>/<image>")
        if not has_images(root, IMAGE_SUFFIXES):
            raise DataError(f"no images under {root}; put one sub-folder per class there")
        splits[role] = _image_folder(root)
    if splits["train"].classes != splits["val"].classes:
        raise DataError(f"the class folders of {train_split} and {val_split} under {source} "
                        f"differ; both need the same classes")
    return dict(name=str(source), classes=list(splits["train"].classes), train=splits["train"],
                val=splits["val"], kind="folder")


# --------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------
def _wds_split(root: str, name: str, split: str) -> tuple[WdsSplit, dict]:
    from timm.data import create_dataset

    try:
        with _quiet("timm.data.readers.reader_wds"):
            reader = create_dataset(f"wds/{name}", root=root, split=split, is_training=False,
                                    batch_size=1).reader
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(
            f"cannot find the WebDataset split {split!r} under {root} ({exc}); give a split "
            f"listed in {root}/_info.json, or a shard pattern such as "
            f"'train-{{000000..000003}}.tar|N' (N: the number of samples)") from None
    info = reader.split_info
    urls = [os.path.join(root, f) for f in info.filenames]
    if not urls:
        raise DataError(f"the WebDataset split {split!r} under {root} lists no shards")
    missing = missing_local(urls)
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards of split {split!r} do not exist "
                        f"(e.g. {missing[0]}); check --data and the split's shard names")
    if not reader.num_samples:
        raise DataError(f"the number of samples of WebDataset split {split!r} under {root} is "
                        f"unknown; append it to the pattern ('{split}|N') or list the split in "
                        f"{root}/_info.json")
    lengths = list(info.shard_lengths) if len(info.shard_lengths) == len(urls) else [None] * len(
        urls)
    return WdsSplit(split, urls, lengths, int(reader.num_samples), info.alt_label or ""), \
        dict(reader.info or {})


def _open_wds(source: str, name: str, train_split: str, val_split: str) -> dict:
    _require("webdataset", "wds/", "webdataset")
    root = str(source)
    if "://" not in root and not root.startswith("pipe:") and not os.path.isdir(root):
        raise DataError(f"WebDataset root {root} is not a folder; give the folder (or URL root) "
                        f"that holds the shards and their _info.json")
    train, info = _wds_split(root, name, train_split)
    val, _ = _wds_split(root, name, val_split)
    num = info.get("num_classes")
    if num is None:  # one pass over the validation labels
        lo, hi = scan_labels(val)
        if lo < 0:
            raise DataError(f"the WebDataset split {val_split!r} has label {lo}; labels are "
                            f"class indices 0..C-1")
        num = hi + 1
    if not isinstance(num, int) or num < 1:
        raise DataError(f"num_classes in {root}/_info.json must be a positive integer; got {num}")
    train.num_classes = val.num_classes = num
    classes = [str(c) for c in info.get("classes", [])] or [str(i) for i in range(num)]
    if len(classes) != num:
        raise DataError(f"{root}/_info.json lists {len(classes)} classes and num_classes {num}")
    return dict(name=root, classes=classes, train=train, val=val, kind="wds")


def open_timm(source: str, dataset: str, train_split: Optional[str],
              val_split: Optional[str]) -> dict:
    """The parts of a :class:`~.sources.Dataset` (name, classes, train, val, kind) for
    ``source`` opened as timm's ``dataset``; see the module docstring."""
    prefix, sep, name = dataset.partition("/")
    prefix = prefix.lower()
    train_split = train_split or DEFAULT_TRAIN_SPLIT
    val_split = val_split or DEFAULT_VAL_SPLIT
    if sep and prefix == "wds":
        return _open_wds(source, name, train_split, val_split)
    path = Path(str(source)).expanduser()
    if sep and prefix == "hfds":
        return _open_hfds(path, name, train_split, val_split)
    if not sep and prefix in ("tar", "folder", "imagefolder"):
        if not path.is_dir():
            raise DataError(f"--data {source} is not a folder; --dataset {dataset} reads the "
                            f"split folders or archives under it")
        if prefix == "tar":
            return _open_tar(path, train_split, val_split)
        return _open_folder(path, train_split, val_split)
    raise DataError(f"--dataset {dataset!r} is not one this tool reads; use one of "
                    f"{', '.join(TIMM_DATASETS)} (timm's names), or leave it out for digits, "
                    f"fashion-mnist, synthetic or an ImageFolder directory")
