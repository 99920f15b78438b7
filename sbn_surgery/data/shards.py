"""WebDataset shards: one split as a list of tar shards, and its deterministic sample stream.

timm's ``create_dataset("wds/NAME", root, split)`` parses the split (a name in the root's
``_info.json``, or a brace pattern such as ``train-{000000..000003}.tar``, optionally with the
sample count after a ``|``) into shard file names, shard lengths and a sample count; this module
reads the shards. timm's own iterator is not used for the epochs because its sample-shuffle
generator is made once per process and carried from epoch to epoch (epoch ``e`` depends on the
epochs run before it in that process, so a resumed run would see other batches), its per-worker
split makes the order depend on the number of loader workers, and its per-worker sample count cuts
without padding (a rank whose shards are short runs fewer batches, and DDP waits forever).

The stream of one rank in one epoch, as :func:`epoch_stream` makes it:

* training: the shard list is shuffled by (seed, epoch), the same on every rank; rank ``r`` of
  ``w`` reads shards ``r, r + w, ...`` of it (timm's split across nodes and ranks) when there are
  at least ``w`` shards, else every rank reads all shards and keeps every ``w``-th sample. Its
  samples pass a shuffle buffer seeded by (seed, epoch, rank) (timm's buffer sizes,
  ``WDS_SHUFFLE_SIZE``/``WDS_INITIAL_SIZE``), and the stream is cut at ``ceil(N / w)`` samples,
  the same on every rank: a rank whose shards hold fewer reads them again, a rank whose shards
  hold more leaves the rest for another epoch (equal shard sizes avoid both).
* validation: in file order, no shuffle; with shard lengths known and at least ``w`` shards each
  rank reads its shards, else every rank keeps every ``w``-th sample.

The main process reads the shards (raw bytes, no decoding); the loader workers only decode and
transform. So the stream does not depend on the number of workers, an epoch replays exactly, and
a resume in the middle of an epoch skips the first ``start`` batches of raw samples without
decoding them (it reads them again: cheap next to decoding, but not free) and then yields exactly
the batches the full epoch would have. What stays exact: any number of loader workers. What does
not: a resume with another number of ranks, another shuffle buffer size (``WDS_SHUFFLE_SIZE``,
``WDS_INITIAL_SIZE``) or changed shards; then the epoch's order differs (each sample is still read
as often as the new setup says).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Iterator, Optional

from ..errors import DataError

__all__ = ["WdsSplit", "RawSample", "RawReader", "epoch_stream", "rank_count", "scan_labels"]

#: Image members of a sample, in the order they are looked for (timm reads jpg;png;webp).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
#: One sample read from a shard: (shard url + key, encoded image bytes, image member, label).
RawSample = tuple[str, bytes, str, int]


@dataclass
class WdsSplit:
    """One split of WebDataset shards: urls, their sample counts (None where unknown) and the
    total sample count ``num_samples``; ``alt_label`` names a field of the json member that holds
    the label (timm's split info), else the ``cls`` member does."""

    name: str
    urls: list[str]
    lengths: list[Optional[int]]
    num_samples: int
    alt_label: str = ""
    num_classes: int = 0  # set when the data set is opened; labels are checked against it
    limits: list[Optional[int]] = field(default_factory=list)  # samples read per shard (subset)

    def __len__(self) -> int:
        return self.num_samples

    def take_first(self, k: int) -> "WdsSplit":
        """The first ``k`` samples in file order (what ``--subset`` picks): the leading shards
        that hold them, the last one cut."""
        if k >= self.num_samples:
            return self
        if any(n is None for n in self.lengths):
            raise DataError(f"--subset on the WebDataset split {self.name!r} needs the length of "
                            f"every shard; list the split with its shard_lengths in _info.json")
        urls, lengths, limits, left = [], [], [], k
        for url, n in zip(self.urls, self.lengths):
            if left <= 0:
                break
            urls.append(url)
            lengths.append(min(n, left))
            limits.append(min(n, left))
            left -= n
        return replace(self, urls=urls, lengths=lengths, num_samples=k, limits=limits)


def _label(sample: dict, split: WdsSplit, where: str) -> int:
    try:
        if split.alt_label:
            value = json.loads(sample["json"])[split.alt_label]
        else:
            value = sample["cls"]
            value = value.decode() if isinstance(value, bytes) else value
        label = int(value)
    except KeyError as exc:
        member = "json" if split.alt_label and "json" not in sample else str(exc)
        raise DataError(f"sample {where} has no {member} member with its label (a shard cut "
                        f"short ends so); each sample needs KEY.cls, or the json field the split "
                        f"info names") from None
    except (ValueError, TypeError) as exc:
        raise DataError(f"sample {where}: its label is not an integer ({exc})") from None
    if split.num_classes and not 0 <= label < split.num_classes:
        raise DataError(f"sample {where} has label {label}, outside 0..{split.num_classes - 1} "
                        f"({split.num_classes} classes); fix the shard or num_classes in "
                        f"_info.json")
    return label


def unsafe_member(name: str) -> bool:
    """Whether a tar member's name climbs out of the archive: a ``..`` component, or an
    absolute path (a name such as ``../x.png`` would otherwise make a class named ``..``)."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/")


def member_error(name: str, archive: str) -> DataError:
    """The one line for a tar member whose name climbs out of its archive."""
    shown = repr(name[:100] + ("..." if len(name) > 100 else ""))
    return DataError(f"{archive}: the tar member {shown} has a '..' component or an absolute "
                     "path; member names are relative paths inside the archive (class/image."
                     "png). Write the archive again from inside its folder")


def _to_raw(sample: dict, split: WdsSplit, url: str) -> RawSample:
    key = str(sample.get("__key__", "?"))
    if unsafe_member(key):
        raise member_error(key, url)
    where = f"{key} in {url}"
    for ext in IMAGE_EXTS:
        if ext in sample:
            return where, bytes(sample[ext]), ext, _label(sample, split, where)
    members = sorted(k for k in sample if not k.startswith("__"))
    raise DataError(f"sample {where} has no image member ({', '.join(IMAGE_EXTS[:4])}, ...); it "
                    f"holds {members}")


def read_shard(split: WdsSplit, s: int) -> Iterator[RawSample]:
    """The samples of shard ``s`` in file order; a shard that cannot be read, or that holds
    fewer samples than its listed length, is a DataError naming it."""
    from webdataset.tariterators import tarfile_samples

    url = split.urls[s]
    limit = split.limits[s] if split.limits else None
    expected = split.lengths[s]
    n = 0
    try:
        for sample in tarfile_samples(iter([{"url": url}])):
            if limit is not None and n >= limit:
                return
            n += 1
            yield _to_raw(sample, split, url)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile, gopen and webdataset raise many kinds
        detail = str(exc.args[0]) if exc.args else type(exc).__name__
        raise DataError(f"cannot read WebDataset shard {url} ({type(exc).__name__}: {detail}) "
                        f"after {n} samples; the file is missing, truncated or not a tar "
                        f"archive: write it again") from None
    if expected is not None and n < expected:
        raise DataError(f"WebDataset shard {url} holds {n} samples, its split info says "
                        f"{expected}; the shard is truncated (write it again) or the info wrong")


def rank_count(split: WdsSplit, rank: int, world: int, train: bool) -> int:
    """Samples rank ``rank`` of ``world`` gets in one epoch (the same each epoch)."""
    if train:
        return math.ceil(split.num_samples / world)
    if _by_shard(split, world, train):
        return sum(split.lengths[rank::world])  # type: ignore[arg-type]
    return len(range(rank, split.num_samples, world))


def _by_shard(split: WdsSplit, world: int, train: bool) -> bool:
    if len(split.urls) < world:
        return False
    return train or all(n is not None for n in split.lengths)


def _rank_samples(split: WdsSplit, order: list[int], rank: int, world: int,
                  train: bool) -> Iterator[RawSample]:
    """One pass over this rank's part of the shards in ``order``."""
    if _by_shard(split, world, train):
        for s in order[rank::world]:
            yield from read_shard(split, s)
        return
    every = (read_shard(split, s) for s in order)
    stream = (item for shard in every for item in shard)
    yield from islice(stream, rank, None, world)


def _buffer_sizes() -> tuple[int, int]:
    try:
        from timm.data.readers import reader_wds

        return reader_wds.SAMPLE_SHUFFLE_SIZE, reader_wds.SAMPLE_INITIAL_SIZE
    except (ImportError, AttributeError):
        return 8192, 2048


def _passes(split: WdsSplit, order: list[int], rank: int, world: int,
            rng: random.Random) -> Iterator[RawSample]:
    """This rank's samples through the shuffle buffer, pass after pass (an epoch may need more
    than its shards hold); each pass is shuffled on its own, so a pass never mixes into the
    one before it."""
    import webdataset as wds

    bufsize, initial = _buffer_sizes()
    while True:
        got = 0
        samples = iter(_rank_samples(split, order, rank, world, True))
        for item in wds.shuffle(bufsize, initial, rng=rng)(samples):
            got += 1
            yield item
        if got == 0:
            raise DataError(f"the WebDataset shards of split {split.name!r} for rank {rank} of "
                            f"{world} hold no samples; check the shards")


def epoch_stream(split: WdsSplit, *, seed: int, epoch: int, rank: int, world: int,
                 train: bool) -> Iterator[RawSample]:
    """The :func:`rank_count` samples of this rank in ``epoch``, as the module docstring says."""
    from .transforms import seed_of

    count = rank_count(split, rank, world, train)
    if not train:
        got = 0
        for item in islice(_rank_samples(split, list(range(len(split.urls))), rank, world, False),
                           count):
            got += 1
            yield item
        if got < count:
            raise DataError(f"the WebDataset split {split.name!r} holds fewer samples than its "
                            f"split info says ({split.num_samples}): rank {rank} got {got} of "
                            f"{count}; fix the count or the shards")
        return
    order = list(range(len(split.urls)))
    random.Random(seed_of(seed, epoch)).shuffle(order)  # the same on every rank
    rng = random.Random(seed_of(seed, epoch, rank))
    yield from islice(_passes(split, order, rank, world, rng), count)


def scan_labels(split: WdsSplit) -> tuple[int, int]:
    """(smallest, largest) label of the split: one pass over its shards, no decoding."""
    lo, hi = None, None
    for s in range(len(split.urls)):
        for _, _, _, label in read_shard(split, s):
            lo = label if lo is None else min(lo, label)
            hi = label if hi is None else max(hi, label)
    if lo is None:
        raise DataError(f"the WebDataset split {split.name!r} holds no samples "
                        f"({len(split.urls)} shards); check the shards")
    return lo, hi


class RawReader:
    """(PIL image, label) of a raw sample, for :class:`~.transforms.SeededImages`."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, item: RawSample):
        from .images import decode_image

        where, data, _, label = item
        return decode_image(io.BytesIO(data), where, self.channels), label


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def missing_local(urls: list[str]) -> list[str]:
    return [u for u in urls if is_local(u) and not os.path.isfile(u)]
