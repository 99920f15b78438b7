"""Image files and pixels without torch (numpy and Pillow only), shared by the data sources and
the serving package: scanning an ImageFolder tree without following a symbolic link loop,
decoding any PIL mode to 8-bit L or RGB over the full range, and PIL's resampling filters under
timm's interpolation names.

Symbolic links are followed once per real path: a linked folder or file is read the first time
its target is reached and skipped after that, so a link loop adds nothing and cannot hang the
scan. 16-bit and 32-bit images (PIL modes ``I;16``, ``I;16B``, ``I``, ``F``) are scaled to 8 bits
instead of clipped (PIL's own ``convert`` clips them to black and white); alpha is dropped after
palette transparency is resolved; decompression bombs, truncated files and extreme aspect ratios
are one :class:`~sbn_surgery.errors.DataError` that names the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["scan_folder", "has_images", "load_image", "decode_image", "MAX_ASPECT", "MAX_PIXELS",
           "INTERPOLATIONS", "resample_filter", "IMAGE_SUFFIXES"]

#: The image files a folder is searched for (by the data sources and by serving).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The largest image decoded (PIL warns from here and refuses twice this as a bomb).
MAX_PIXELS = 89_478_485
#: The longest side may be at most this many times the shortest: resizing the shortest side to
#: the input size would otherwise make a gigapixel image of a 100000x1 file.
MAX_ASPECT = 50


def scan_folder(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...],
                ) -> list[tuple[str, int]]:
    """(path, class index) of every image under ``directory/<class>/``, sorted per class as
    torchvision's ``make_dataset`` sorts them. Each real folder and file is taken once, and a
    link never leads a class into the split folder or another class's folder."""
    seen: set[str] = set()
    samples = []
    tops = {cls: os.path.realpath(os.path.join(directory, cls)) for cls in class_to_idx}
    fenced = set(tops.values()) | {os.path.realpath(directory)}
    for cls in sorted(class_to_idx):
        top = os.path.join(directory, cls)
        found = []
        for root, dirs, files in os.walk(top, followlinks=True):
            real = os.path.realpath(root)
            if real in seen or (real in fenced and real != tops[cls]):
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if not name.lower().endswith(extensions):
                    continue
                target = os.path.realpath(path)
                if target in seen or not os.path.isfile(target):
                    continue
                seen.add(target)
                found.append((path, class_to_idx[cls]))
        samples += found
    return samples


def _to_8bit(img):
    """``img`` as mode L, RGB or RGBA with 8 bits a channel over the full range."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit as PIL opens it: 0..65535
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if mode == "F":  # float: [0, 1] when it fits there, else [0, 255]
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if mode in ("P", "PA"):  # resolve palette transparency before the alpha is dropped
        return img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
    if mode in ("LA", "La"):
        return img.convert("L")
    return img


def load_image(path: str, channels: int):
    """A PIL image of ``path`` in mode L (``channels == 1``) or RGB, 8 bits over the full range.
    Every failure (not an image, truncated, a bomb, 1xN) is a :class:`DataError` naming the file.
    """
    try:
        with open(path, "rb") as f:
            return decode_image(f, path, channels)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def decode_image(fileobj, name: str, channels: int):
    """:func:`load_image` for an open binary file (a tar member, bytes in a WebDataset shard, a
    Hugging Face dataset cell); ``name`` says where it came from in error messages."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns from MAX_PIXELS (refused below, with the size) and raises from twice that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fileobj)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(f"image {name} is {w}x{h} ({w * h / 1e6:.0f} MP), more than "
                                f"{MAX_PIXELS / 1e6:.0f} MP; downscale it or remove it")
            if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
                raise DataError(f"image {name} is {w}x{h}: sides more than {MAX_ASPECT}:1 "
                                "apart; crop it or remove it")
            img.load()
            img = _to_8bit(img)
            return img.convert("L" if channels == 1 else "RGB")
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {name} is a decompression bomb ({exc}); remove it") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as exc:  # UnidentifiedImageError is OSError
        raise DataError(f"cannot read image {name}: {exc}; remove or replace the file") from None


def has_images(folder: Path, extensions: tuple[str, ...]) -> bool:
    """Whether any image file is under ``folder`` (links followed once per real path)."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if any(n.lower().endswith(extensions) and os.path.isfile(os.path.join(root, n))
               for n in files):
            return True
    return False


#: timm's interpolation names (``timm.data.transforms.str_to_pil_interp``) and PIL's filters.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def resample_filter(name: str) -> int:
    """PIL's resampling filter for timm's interpolation ``name``; a :class:`DataError` for any
    other name."""
    from PIL import Image

    if name not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATIONS)}")
    return int(getattr(Image.Resampling, name.upper()))
