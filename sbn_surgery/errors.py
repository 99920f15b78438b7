"""Errors a user can cause. The CLI prints them in one red line and exits 2."""

from __future__ import annotations


class SbnSurgeryError(Exception):
    """Base class: the message says what was wrong, where, and what to do."""


class RecipeError(SbnSurgeryError):
    """A recipe is missing, does not parse, or does not validate."""


class SurgeryError(SbnSurgeryError):
    """A recipe cannot be applied to a model (no match, applied twice, ...)."""


class ModelError(SbnSurgeryError):
    """An unknown timm model name or unusable model arguments."""


class CheckpointError(SbnSurgeryError):
    """A checkpoint cannot be read or does not fit the model."""


class DataError(SbnSurgeryError):
    """A data source does not exist or holds nothing usable."""


class DeviceError(SbnSurgeryError):
    """A device was asked for that this machine does not have."""


class ExportError(SbnSurgeryError):
    """An export cannot be written in the form asked for."""


class ParityError(SbnSurgeryError):
    """An exported file does not match PyTorch within tolerance."""


class ServingError(SbnSurgeryError):
    """An exported file cannot be served as asked: its metadata, its input, an image, a data set
    for validation or calibration, or a quantized file that misses its accuracy bounds."""


class WriteError(SbnSurgeryError, OSError):
    """A file could not be written (no space, a read-only file system, permissions): ``path``
    and ``errno`` (None when the cause had no OS error number). Also an OSError, so code that
    catches those for a failed write still does."""

    def __init__(self, message: str, path=None, errno=None) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno


def near_names(name: str, candidates, n: int = 5) -> list[str]:
    """Closest candidates to ``name`` (for 'did you mean' hints)."""
    import difflib

    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if len(close) < n:
        low = name.lower()
        for cand in candidates:
            if cand not in close and (low in cand.lower() or cand.lower() in low):
                close.append(cand)
            if len(close) >= n:
                break
    return close
