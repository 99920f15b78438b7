"""What a parity check or a latency run found: the report dataclasses and the parity failure."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ParityError

__all__ = ["ParityCase", "LayerParity", "ParityReport", "ParityFailed", "BenchReport",
           "FileLatency"]


@dataclass
class ParityCase:
    """One run: ``source`` is ``random``, ``images``, or ``other-size`` (random inputs at another
    spatial size, for a file with a symbolic size). ``error``: why onnxruntime could not run it."""

    source: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float
    error: Optional[str] = None


@dataclass
class LayerParity:
    """One SBN layer in the file against PyTorch, errors relative to the layer's output scale
    (input: to its input scale). ``max_*_err``: at the layer's output, including whatever came
    from upstream; ``input_rel_err``: what arrived at its input; ``own_rel_err``: the layer's
    own error (its output against the PyTorch layer run on the input the file gave it);
    ``passed``: ``own_rel_err <= rtol``. None where the graph no longer shows the layer."""

    module: str
    stats: str
    form: str
    output: Optional[str]
    max_abs_err: Optional[float]
    max_rel_err: Optional[float]
    input_rel_err: Optional[float]
    own_rel_err: Optional[float]
    passed: Optional[bool]


@dataclass
class ParityReport:
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float
    passed: bool
    rtol: float
    min_top1: float
    cases: list[ParityCase] = field(default_factory=list)
    layers: Optional[list[LayerParity]] = None
    first_bad_layer: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def failing(self) -> list[ParityCase]:
        return [c for c in self.cases if not (c.max_rel_err <= self.rtol and c.top1_agreement >= self.min_top1)]

    def summary(self) -> dict[str, Any]:
        return {"max_abs_err": _finite(self.max_abs_err), "max_rel_err": _finite(self.max_rel_err),
                "top1_agreement": self.top1_agreement, "passed": self.passed}

    def to_json(self) -> dict[str, Any]:
        cases = [{k: _finite(v) for k, v in asdict(c).items()} | {"shape": list(c.shape)}
                 for c in self.cases]
        out = {**self.summary(), "rtol": self.rtol, "min_top1": self.min_top1, "cases": cases,
               "notes": list(self.notes)}
        if self.layers is not None:
            out["layers"] = [{k: _finite(v) for k, v in asdict(layer).items()}
                             for layer in self.layers]
            out["first_bad_layer"] = self.first_bad_layer
        return out

    def describe(self) -> str:
        text = (f"max_rel_err {self.max_rel_err:.2e} (tolerance {self.rtol:.1e}), max_abs_err "
                f"{self.max_abs_err:.2e}, top-1 agreement {self.top1_agreement:.1%} (required "
                f"{self.min_top1:.1%})")
        bad = self.failing()
        if bad:
            c = bad[0]
            text += f"; first failing run: {c.source} input {'x'.join(map(str, c.shape))}"
            if c.error:
                text += f" ({c.error})"
        return text


def _finite(v: Any) -> Any:
    """JSON has no infinity: a run that could not be compared reports None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


class ParityFailed(ParityError):
    """The exported file does not match PyTorch; the file is kept for inspection."""

    def __init__(self, report: ParityReport, path: Union[str, Path],
                 target: Optional[Union[str, Path]] = None) -> None:
        self.report = report
        self.path = Path(path)
        self.target = Path(target) if target is not None else None
        where = f"; the error starts at {report.first_bad_layer}" if report.first_bad_layer else ""
        kept = "The file is kept for inspection" if target is None else (
            f"{self.target} was not written (a file there is unchanged); the failing file is kept "
            f"for inspection at {self.path}")
        super().__init__(
            f"parity failed for {self.path}: {report.describe()}{where}. {kept}: `sbn-surgery parity {self.path} CHECKPOINT --per-layer` shows where the "
            "error starts; try --mode dft (the faithful form), or loosen --rtol if the error is "
            "rounding."
        )


@dataclass
class FileLatency:
    """One file of a bench run: its median latency and its ratio to the baseline (the
    ``--against`` file, else the first file)."""

    onnx: str
    latency_ms: float
    ratio: float


@dataclass
class BenchReport:
    onnx: str
    batch: int
    input_shape: tuple[int, ...]
    latency_ms: float
    repeats: int
    warmup: int
    threads: Optional[int]
    clock: str = "wall"
    against: Optional[str] = None
    against_latency_ms: Optional[float] = None
    ratio: Optional[float] = None
    files: list[FileLatency] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out
