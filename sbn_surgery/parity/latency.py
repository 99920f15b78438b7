"""onnxruntime latency of an exported file, alone or against another file."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import ParityError
from ..onnx_io import load_onnx, read_onnx_metadata
from .reports import BenchReport, FileLatency
from .runtime import check_numel, image_input_dims, input_chw, run, session

__all__ = ["bench"]


def _open(f: Path, batch: int, input_size, threads):
    """(session, feed) for timing ``f`` at ``batch``, every input size check done first."""
    proto = load_onnx(f, load_external_data=False)
    dims = image_input_dims(proto, f)
    size = input_chw(dims, read_onnx_metadata(proto), input_size, f)
    if dims[0] is not None and dims[0] != batch:
        raise ParityError(f"{f} has a fixed batch size of {dims[0]}; bench it with --batch {dims[0]}")
    check_numel((batch, *size), f)
    sess = session(f, threads)
    x = np.random.default_rng(0).standard_normal((batch, *size)).astype(np.float32)
    return sess, {sess.get_inputs()[0].name: x}


def bench(
    onnx_path: Union[str, Path, Sequence[Union[str, Path]]],
    against: Optional[Union[str, Path]] = None,
    *,
    batch: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    threads: Optional[int] = None,
    input_size: Optional[tuple[int, int, int]] = None,
    clock: str = "wall",
    progress=None,
) -> BenchReport:
    """onnxruntime CPU latency of one or more files (``onnx_path``: a path or a list), each the
    median of ``repeats`` runs after ``warmup`` runs that are not timed, all timed alternately
    in the same loop on the same input. The ratio of each is its latency over the baseline's:
    ``against`` where given (also timed in the loop), else the first file's. ``report.files``
    lists every file; ``latency_ms``/``ratio`` are the first file's.

    ``clock="cpu"`` times each run by the process's CPU time instead of the wall clock: with
    ``threads=1`` that is the work a run costs, whatever else the machine is doing (a busy
    machine makes wall-clock ratios noisy)."""
    if clock not in ("wall", "cpu"):
        raise ParityError(f"clock must be 'wall' or 'cpu'; got {clock!r}")
    timer = time.perf_counter if clock == "wall" else time.process_time
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ParityError(f"bench needs batch >= 1, repeats >= 1, warmup >= 0; got {batch}, "
                          f"{repeats}, {warmup}")
    given = [onnx_path] if isinstance(onnx_path, (str, Path)) else list(onnx_path)
    if not given:
        raise ParityError("bench needs at least one ONNX file")
    files = [Path(f) for f in given] + ([Path(against)] if against is not None else [])
    runs = [_open(f, batch, input_size, threads) for f in files]
    shapes = {tuple(feed[next(iter(feed))].shape) for _, feed in runs}
    if len(shapes) > 1:
        raise ParityError(f"the files take different inputs ({', '.join(sorted(map(str, shapes)))}); "
                          "compare files with the same input size (or pass --input-size)")
    for _ in range(max(warmup, 1)):  # one untimed run at least: a file that cannot run says so
        for (sess, feed), f in zip(runs, files):
            run(sess, feed, f)
    times: list[list[float]] = [[] for _ in runs]
    for i in range(repeats):
        for k, (sess, feed) in enumerate(runs):
            t0 = timer()
            sess.run(None, feed)
            times[k].append(timer() - t0)
        if progress is not None:
            progress("bench", i + 1, repeats)
    med = [statistics.median(t) * 1e3 for t in times]
    base = med[-1] if against is not None else med[0]
    shape = next(iter(shapes))
    report = BenchReport(onnx=str(files[0]), batch=batch, input_shape=shape, latency_ms=med[0],
                         repeats=repeats, warmup=warmup, threads=threads, clock=clock)
    report.files = [FileLatency(str(f), m, m / base) for f, m in zip(files, med)]
    if against is not None:
        report.against, report.against_latency_ms = str(files[-1]), med[-1]
        report.ratio = med[0] / med[-1]
    return report
