"""What building a model did that its user should hear about: a classifier that starts random
(the head reset), and the images SBN statistics were calibrated on.

``convert`` and ``finetune`` fill a :class:`SetupReport` as they go; the CLI prints one line per
event and puts :meth:`SetupReport.to_json` in ``--json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["HeadReset", "Calibration", "SetupReport"]


@dataclass
class HeadReset:
    """The classifier was replaced by a random one of ``after`` classes. ``before``: the class
    count of the checkpoint's head (``cause`` ``checkpoint``: it was left out when loading) or of
    the model's (``data``: reset to the data's class count)."""

    before: Optional[int]
    after: int
    cause: str  # "checkpoint" or "data"

    def line(self) -> str:
        was = f"{self.before}-class " if self.before is not None else ""
        if self.cause == "checkpoint":
            return (f"head: the checkpoint's {was}classifier is left out; a new {self.after}-class "
                    "head starts random")
        return f"head: reset from {self.before} to {self.after} classes (the data's); it starts random"


@dataclass
class Calibration:
    """SBN running statistics were estimated on ``images`` images in ``batches`` batches of
    ``source`` (``synthetic``: random normal images; else a data source's training images)."""

    source: str
    images: int
    batches: int

    def line(self) -> str:
        what = "random normal (synthetic) images" if self.source == "synthetic" else \
            f"training images of {self.source}"
        return (f"calibration: SBN statistics from {self.images} {what} "
                f"({self.batches} batch{'es' if self.batches != 1 else ''})")


@dataclass
class SetupReport:
    head: Optional[HeadReset] = None
    calibration: Optional[Calibration] = None

    def lines(self) -> list[str]:
        return [e.line() for e in (self.head, self.calibration) if e is not None]

    def to_json(self) -> dict[str, Any]:
        return {"head": None if self.head is None else asdict(self.head),
                "calibration": None if self.calibration is None else asdict(self.calibration)}
