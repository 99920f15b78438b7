"""Image files for the data sources: decoding any PIL mode to 8-bit and scanning ImageFolder
trees. The code lives in :mod:`sbn_surgery.imaging`, which imports no torch, so that what runs
on a serving box (``sbn_surgery.serving``) reads images by the same rules as training."""

from ..imaging import (MAX_ASPECT, MAX_PIXELS, decode_image, has_images, load_image,
                       scan_folder)

__all__ = ["scan_folder", "has_images", "load_image", "decode_image", "MAX_ASPECT", "MAX_PIXELS"]
