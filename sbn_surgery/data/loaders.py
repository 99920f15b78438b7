"""Loaders: batches of one split for one process, deterministic per (seed, epoch, rank, batch)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import DataError
from .augment import TensorAugment, check_aa, check_reprob, keep_zero_bit_posterize
from .shards import RawReader, epoch_stream, rank_count
from .sources import (SPLIT_SEED, Dataset, TensorSplit, _apply_subset, _split_generator,
                      is_builtin, open_source)
from .transforms import (IndexedReader, SeededImages, fit_channels, prepare_batch, seed_of,
                         train_transform_args)

#: Default input size (H = W) for the built-in sources, whose native images are 8x8 to 32x32:
#: big enough for a ResNet's five stride-2 stages, small enough for a CPU.
SMALL_IMAGE_SIZE = 64

# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------
class Loader:
    """Batches of one split for one process: ``iter_epoch(epoch, start)`` yields (images, labels).

    Training loaders shuffle with ``DistributedSampler`` (seed + epoch; with several processes
    each rank gets its shard, padded so every rank runs the same number of batches) and, if
    ``augment``, augment; WebDataset shards are streamed instead (:mod:`.shards`), with the same
    number of batches on every rank.
    Validation loaders keep the order and split it between ranks without padding.
    ``aa`` and ``reprob`` (training with augmentation only) are timm's auto-augment and random
    erasing (:mod:`.augment`).
    ``set_epoch`` + ``iter`` gives the DataLoader-style interface.
    """

    def __init__(self, ds: Dataset, split: Any, cfg: dict, batch_size: int, *, train: bool,
                 seed: int = 0, rank: int = 0, world: int = 1, workers: int = 0,
                 augment: Optional[bool] = None, aa: Optional[str] = None,
                 reprob: float = 0.0, train_flags: Optional[dict] = None) -> None:
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1; got {batch_size}")
        self.dataset = ds
        self.split = split
        self.data_config = cfg
        self.batch_size = int(batch_size)
        self.train = train
        self.augment = train and (default_augment(ds) if augment is None else bool(augment))
        self.aa = check_aa(aa) if self.augment else None
        self.reprob = check_reprob(reprob) if self.augment else 0.0
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.workers = min(int(workers), usable_cpus())  # more only oversubscribe the cores
        self.epoch = 0
        self.train_flags = dict(train_flags or {})  # timm's scale, ratio, hflip, ...
        self.classes = ds.classes
        self._images = None  # per-image path: (SeededImages, reader of one item)
        self._extra = None  # in-memory path: auto-augment and random erasing
        if ds.kind == "tensor":
            extra = TensorAugment(self.aa, self.reprob, cfg)
            self._extra = extra if extra.active else None
        else:
            channels = int(cfg["input_size"][0])
            read = RawReader(channels) if ds.kind == "wds" else IndexedReader(split, channels)
            self._images = SeededImages(read, self._image_transform())

    def _image_transform(self):
        from timm.data import create_transform

        cfg = self.data_config
        extra: dict = dict(interpolation=cfg["interpolation"])
        if self.augment:
            extra = dict(auto_augment=self.aa, re_prob=self.reprob,
                         **train_transform_args(self.train_flags, cfg["interpolation"]))
        return keep_zero_bit_posterize(create_transform(
            cfg["input_size"], is_training=self.augment, mean=cfg["mean"], std=cfg["std"],
            crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"), **extra,
        ))

    @property
    def streamed(self) -> bool:
        """Whether the split is read as a stream (WebDataset shards), not by index."""
        return self.dataset.kind == "wds"

    @property
    def total_samples(self) -> int:
        """Images in the split (all ranks together, without padding)."""
        return len(self.split)

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample order for ``epoch`` (splits read by index)."""
        n = len(self.split)
        if self.train:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            return list(sampler)
        return list(range(self.rank, n, self.world))

    def _batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: sample indices, or positions in the stream."""
        if self.streamed:
            order = list(range(rank_count(self.split, self.rank, self.world, self.train)))
        else:
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
        if self.streamed:
            yield from self._run(self._stream_keys(batches, epoch, start))
            return
        if self._images is not None:
            keyed = [[(i, self._seed(epoch, b, j)) for j, i in enumerate(batches[b])]
                     for b in range(start, len(batches))]
            yield from self._run(keyed)
            return
        split: TensorSplit = self.split
        for b in range(start, len(batches)):
            idx = torch.tensor(batches[b], dtype=torch.long)
            gen = None
            if self.augment:
                gen = torch.Generator().manual_seed(seed_of(self.seed, epoch, self.rank, b))
            x = prepare_batch(split.images[idx], self.data_config, gen, self.dataset.hflip,
                              self._extra, seed_of(self.seed, epoch, self.rank, b, 1))
            yield x, split.labels[idx]

    def _seed(self, epoch: int, b: int, j: int) -> Optional[int]:
        return seed_of(self.seed, epoch, self.rank, b, j) if self.augment else None

    def _stream_keys(self, batches: list[list[int]], epoch: int, start: int):
        """Keys (raw sample, seed) of batches ``start``, ... of this rank's stream; the first
        ``start`` batches are read and skipped without decoding."""
        stream = epoch_stream(self.split, seed=self.seed, epoch=epoch, rank=self.rank,
                              world=self.world, train=self.train)
        skip = sum(len(b) for b in batches[:start])
        for _ in zip(range(skip), stream):
            pass
        for b in range(start, len(batches)):
            yield [(item, self._seed(epoch, b, j))
                   for j, item in zip(range(len(batches[b])), stream)]

    def _run(self, keyed):
        """Decode and transform the keyed batches, in ``workers`` processes if asked for."""
        if isinstance(keyed, list) and not keyed:
            return
        loader = torch.utils.data.DataLoader(self._images, batch_sampler=keyed,
                                             num_workers=self.workers,
                                             persistent_workers=False,
                                             worker_init_fn=_worker_signals)
        batches = iter(loader)
        failed = None
        try:
            for x, y in batches:
                yield x, y
        except DataError as exc:  # from a worker, its message carries the worker's traceback
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            failed = last.split("DataError: ", 1)[-1]
        finally:
            _end_workers(batches)
        if failed is not None:  # raised outside the handler: see _end_workers
            raise DataError(failed)


def _end_workers(batches) -> None:
    """End a DataLoader iterator's worker processes now, on every way out of an epoch (its end,
    a ``close()``, an error), as its finalizer would. Left to the finalizer, an iterator that an
    exception still refers to (the worker's error, chained as the context of the one raised,
    holds the iterator's frames) kept its worker alive until the garbage collector freed the
    cycle; that finalizer then waited for the worker in vain and SIGTERMed it (see
    :func:`_worker_signals`), 10 s, and left it a zombie."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's; none without workers
    if shutdown is not None:
        shutdown()


#: How long a loader worker goes on after a SIGTERM before it exits on its own (status 0).
WORKER_TERM_GRACE_S = 30.0
_leaving = None  # a worker's exit timer, once a SIGTERM started it


def _worker_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn
    """A loader worker leaves Ctrl-C to the main process and outlives a SIGTERM by
    :data:`WORKER_TERM_GRACE_S`: both reach every process of the group (a terminal, a scheduler
    preempting the job), and the main process, which stops a run after the step in progress, may
    still wait for that step's batch; it then ends its workers itself. Should it not (a SIGTERM
    from it: multiprocessing terminates daemonic children at exit), the worker exits once the
    grace is over, so no process waits for it forever."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


def _exit_after_grace(signum, frame) -> None:  # noqa: ARG001 - a signal handler
    import os
    import threading

    global _leaving
    if _leaving is None:
        _leaving = threading.Timer(WORKER_TERM_GRACE_S, os._exit, (0,))
        _leaving.daemon = True
        _leaving.start()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed=True needs an initialized process group (torchrun)")
    return dist.get_rank(), dist.get_world_size()


def default_augment(ds: Dataset) -> bool:
    """Training augmentation by default: on for images read from files (an ImageFolder, timm's
    data sets: timm's training transform), off for the built-in in-memory sources, whose small
    centered images are learnt fastest as they are in the few epochs one runs on them (resnet18,
    fashion-mnist, 5000 images, 3 epochs: 88 % val top-1 without, 80 % with shifts and flips)."""
    return ds.kind != "tensor"


def build_loaders(source: Union[str, Path, Dataset], data_config: dict, batch_size: int, *,
                  subset: Optional[int] = None, seed: int = 0, workers: int = 0,
                  distributed: bool = False, augment: Optional[bool] = None,
                  aa: Optional[str] = None, reprob: float = 0.0,
                  train_flags: Optional[dict] = None) -> tuple[Loader, Loader, int]:
    """(train loader, val loader, number of classes) for ``source`` preprocessed per
    ``data_config`` (timm's: input_size, interpolation, mean, std, crop_pct). ``augment``
    (training only): None for :func:`default_augment`; images read from files get timm's
    training transform, in-memory ones a random shift of up to 1/8 and, where label-preserving,
    a flip. ``aa`` (timm's auto-augment string, e.g. ``rand-m9-mstd0.5``) and ``reprob``
    (random erasing probability) apply to training only and turn augmentation on.
    ``train_flags``: timm's training flags for images read from files (scale, ratio, hflip,
    vflip, color_jitter, train_interpolation; see ``transforms.TRAIN_FLAGS``)."""
    aa = check_aa(aa)
    reprob = check_reprob(reprob)
    if (aa or reprob) and augment is False:
        raise DataError("--aa and --reprob augment the training images; they cannot be used "
                        "with augmentation turned off")
    if aa or reprob:
        augment = True
    ds = source if isinstance(source, Dataset) else open_source(source)
    ds = _apply_subset(ds, subset)
    cfg = fit_channels(data_config)
    rank, world = _dist_info(distributed)
    common = dict(seed=seed, rank=rank, world=world, workers=workers)
    train = Loader(ds, ds.train, cfg, batch_size, train=True, augment=augment, aa=aa,
                   reprob=reprob, train_flags=train_flags, **common)
    val = Loader(ds, ds.val, cfg, batch_size, train=False, **common)
    if len(ds.train) < 2:
        raise DataError(f"the training split of {ds.name} has {len(ds.train)} image(s); need 2+")
    return train, val, ds.num_classes


def calibration_batches(source: Union[str, Path, Dataset], data_config: dict, batch_size: int,
                        num_batches: int, subset: Optional[int] = None) -> list[Tensor]:
    """``num_batches`` batches of preprocessed training images (eval preprocessing, a fixed
    shuffle), e.g. to calibrate SBN statistics on real data. WebDataset shards give the first
    batches of a shuffled pass over the training split. ``subset``: draw only from the
    training images ``build_loaders(..., subset=)`` trains on."""
    ds = _apply_subset(source if isinstance(source, Dataset) else open_source(source), subset)
    cfg = fit_channels(data_config)
    count = batch_size * max(0, int(num_batches))
    if ds.kind == "wds":
        loader = Loader(ds, ds.train, cfg, batch_size, train=True, augment=False,
                        seed=SPLIT_SEED)
        return [x for x, _ in islice(loader.iter_epoch(0), max(0, int(num_batches)))]
    order = torch.randperm(len(ds.train), generator=_split_generator())[:count]
    if ds.kind == "tensor":
        picked = ds.train.take(order)
    else:
        picked = torch.utils.data.Subset(ds.train, order.tolist())
    loader = Loader(ds, picked, cfg, batch_size, train=False)
    return [x for x, _ in loader.iter_epoch(0)]


def default_input_size(ds_or_source: Union[str, Path, Dataset], model_size: Sequence[int],
                       in_chans: int = 3) -> tuple[int, int, int]:
    """The input size finetune uses when none is given: ``SMALL_IMAGE_SIZE`` for the built-in
    sources (native 8x8 to 32x32 images), the model's own size for an ImageFolder."""
    name = ds_or_source.name if isinstance(ds_or_source, Dataset) else str(ds_or_source)
    if is_builtin(name):
        return (in_chans, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)
    size = tuple(int(v) for v in model_size)
    return (in_chans,) + size[-2:]  # type: ignore[return-value]
