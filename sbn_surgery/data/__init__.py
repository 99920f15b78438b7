"""Datasets and loaders for fine-tuning: the embedded default, Fashion-MNIST, ImageFolder, synthetic.

Sources (the ``--data`` argument):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes); offline
  anywhere. A fixed, class-stratified 80/20 split gives train and val.
* ``fashion-mnist``: the idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), else torchvision's downloader where a network exists.
  Train is the 60000-image training set, val the 10000-image test set.
* a directory in ImageFolder layout with ``train/`` and ``val/`` (one sub-folder per class).
  Symbolic links are followed once per real path (a loop adds nothing; a link never leads into
  another class's folder); images of any PIL mode (16-bit, float, palette, CMYK, ...) reach the
  model over the full 8-bit range; unreadable, truncated, oversized (decompression bombs) and
  extremely elongated images are one error naming the file (see :mod:`.images`).
* ``synthetic``: 10 classes of smooth random patterns plus noise, 3x32x32, for tests.
* with ``dataset`` (timm's ``--dataset`` names), the source is the root of one of timm's data
  sets, opened through ``timm.data.create_dataset`` with timm's ``--train-split``/``--val-split``
  conventions (see :mod:`.timm_sources`): ``wds/NAME`` (WebDataset tar shards, streamed, split
  across ranks and nodes), ``hfds/NAME`` (a Hugging Face dataset on local disk, never
  downloaded), ``tar`` (an archive per split), ``folder``/``imagefolder``.

Preprocessing comes from timm's data config for the model (``resolve_data_config``): images are
resized to its input size, normalized with its mean and std, and grayscale images are repeated to
the model's channel count. The built-in sources live in memory as uint8 tensors at their native
size and are preprocessed a batch at a time (one interpolate, one normalize), so a CPU epoch
spends its time in the model. ImageFolder images go through timm's own transforms, per image.

Training augmentation (``augment``; by default on for images read from files, off for the
built-in sources) is timm's training transform for images read from files, and a random shift of
up to 1/8 of the size plus, where label-preserving, a horizontal flip for the in-memory sources.
``aa`` (timm's AutoAugment/RandAugment/AugMix string, e.g. ``rand-m9-mstd0.5``) and ``reprob``
(random erasing) come from timm's transform factory, also for the in-memory sources
(:mod:`.augment`); they turn augmentation on.

Every random choice is a function of (seed, epoch, rank, batch): the shuffle order comes from a
``DistributedSampler`` (also with one process), and the augmentation of each batch (or image)
uses its own generator. An epoch can therefore be replayed exactly, also from the middle, which
is what ``--resume`` relies on. WebDataset shards have no random access: their per-rank stream is
a function of (seed, epoch, rank, number of ranks) and a resume skips the first batches of it (see
:mod:`.shards`). ``--subset N`` always picks the same N training images (and N/5 validation
images), whatever the seed; on shards, the first N in file order.
"""

from .augment import check_aa, check_reprob
from .loaders import (SMALL_IMAGE_SIZE, Loader, build_loaders, calibration_batches,
                      default_augment, default_input_size)
from .sources import (BUILTIN_SOURCES, FASHION_MNIST_DIRS, Dataset, TensorSplit, is_builtin,
                      open_source)
from .timm_sources import TIMM_DATASETS
from .transforms import data_config_for

__all__ = [
    "BUILTIN_SOURCES",
    "FASHION_MNIST_DIRS",
    "SMALL_IMAGE_SIZE",
    "TIMM_DATASETS",
    "Dataset",
    "TensorSplit",
    "Loader",
    "build_loaders",
    "calibration_batches",
    "check_aa",
    "check_reprob",
    "data_config_for",
    "default_augment",
    "default_input_size",
    "is_builtin",
    "open_source",
]
