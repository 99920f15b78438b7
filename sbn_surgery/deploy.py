"""export_onnx: a converted model -> one ONNX file in the chosen SBN form, with parity proven.

Composes the last two arrows of the pipeline: :mod:`sbn_surgery.export` writes the file to a
staging place, :mod:`sbn_surgery.parity` checks it against the model, and only a file that
passes is moved to its path. Neither package knows the other.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .errors import ExportError, ParityError
from .files import staging_dir, write_error
from .export import DEFAULT_OPSET, EXPORT_STEPS, ExportResult, check_export_options, write_onnx
from .export.exporter import WRITE_STEPS
from .parity import ParityFailed, ParityReport, check_parity
from .parity.check import stack_images
from .progress import ProgressFn

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    mode: str = "fold",
    opset: int = DEFAULT_OPSET,
    input_size: Optional[tuple[int, int, int]] = None,
    dynamic_batch: bool = True,
    *,
    dynamic_size: Optional[bool] = None,
    batch_size: int = 1,
    layout: str = "auto",
    parity: bool = True,
    images: Optional[Union[Tensor, Iterable[Tensor]]] = None,
    rtol: Optional[float] = None,
    min_top1: float = 1.0,
    parity_batches: tuple[int, ...] = (1, 3),
    progress: Optional[ProgressFn] = None,
) -> ExportResult:
    """Export a (converted) model to one ONNX file and check it against PyTorch.

    ``mode``: ``fold`` (default, deployment: channel-mode SBN as elementwise ops with its scale
    folded into the BatchNorm in front where that is exact; frequency mode as its circular filter
    in matmul form with one constant pattern), ``matmul`` (the 2-D DFT as constant matrices, no
    DFT op; fixed size), ``dft`` (ONNX DFT nodes; the faithful form).
    ``input_size`` (C, H, W): default ``model.sbn_meta["input_size"]``, else timm's.
    ``dynamic_batch``: a symbolic batch axis (else ``batch_size``). ``dynamic_size``: a symbolic
    spatial size; None picks it wherever possible (channel mode in fold and dft modes, unless the
    model has TensorFlow-'SAME' padding layers, whose symbolic tracing takes minutes), and falls
    back to a fixed size, with a note in ``result.notes``, when the exporter cannot write the
    graph with a symbolic size (after timm's attention was made explicit) or the parity
    check of the symbolic-size file fails in any way (e.g. adaptive pooling that upsamples,
    written for one size; a shape expression the exporter lost); True where impossible
    (frequency statistics, matmul mode) is an :class:`ExportError`.
    ``layout``: the matmul form's layout (``auto``, ``dense``, ``separable``).

    The caller's model is not modified. Unless ``parity=False``, the file is run with
    onnxruntime on random inputs (and ``images``) at batch sizes ``parity_batches`` and compared
    with the model in eval mode before it is moved to ``path``; a failure raises
    ``sbn_surgery.parity.ParityFailed`` (a ``ParityError``), leaves whatever was at ``path`` as it
    was, and keeps the failing file beside it as ``NAME.parity-failed.onnx`` for inspection.
    """
    if images is not None and parity:  # once: the fixed-size fallback runs parity again
        images = stack_images(images)
    _check_parity_options(rtol, min_top1)
    plan = check_export_options(model, path, mode, opset, input_size, dynamic_batch, dynamic_size,
                                batch_size)
    if parity and images is not None and tuple(images.shape[1:]) != tuple(plan.size):
        raise ExportError(f"parity images have shape {tuple(images.shape)}; the export takes "
                          f"(N, {', '.join(map(str, plan.size))}). Resize them to the input size.")
    if not parity:
        result = write_onnx(model, plan, plan.path, layout=layout, progress=progress)
        _step(progress, EXPORT_STEPS, "done")
        return result
    with staging_dir(plan.path) as folder:  # checked there; moved to the path once it passes
        staging = folder / plan.path.name
        result = write_onnx(model, plan, staging, layout=layout, progress=progress)
        _step(progress, WRITE_STEPS, "parity")
        why = _check_file(result, staging, _float_cpu(model), dynamic_size, images=images,
                          rtol=rtol, min_top1=min_top1, batch_sizes=parity_batches,
                          input_size=plan.size)
        if why:
            # the symbolic-size graph was picked, not asked for, and does not hold (e.g.
            # adaptive pooling written for one size, a shape expression the exporter lost):
            # write a fixed-size file instead, and say so
            shutil.rmtree(folder, ignore_errors=True)
            fixed = export_onnx(model, plan.path, mode, opset, plan.size, dynamic_batch,
                                dynamic_size=False, batch_size=batch_size, layout=layout,
                                parity=True, images=images, rtol=rtol, min_top1=min_top1,
                                parity_batches=parity_batches, progress=progress)
            fixed.notes.insert(0, _fixed_size_note(why))
            return fixed
        if not result.parity.passed:
            raise ParityFailed(result.parity, _keep_failed(staging, plan.path), target=plan.path)
        _publish(staging, plan.path)
    _step(progress, EXPORT_STEPS, "done")
    return result


def _step(progress: Optional[ProgressFn], i: int, info: str) -> None:
    if progress is not None:
        progress("export", i, EXPORT_STEPS, info)


def _check_parity_options(rtol: Optional[float], min_top1: float) -> None:
    if rtol is not None and not (math.isfinite(rtol) and rtol > 0):
        raise ExportError(f"--rtol must be a finite number > 0; got {rtol}. Leave it out for the "
                          "default, sized by the export mode.")
    if not 0 <= min_top1 <= 1:
        raise ExportError(f"--min-top1 must be in [0, 1]; got {min_top1}")


def _float_cpu(model: nn.Module) -> nn.Module:
    """The parity reference: the file computes in float32 on the CPU, and so must the model (on
    CUDA, TF32 convolutions alone would differ by about 1e-3)."""
    param = next(iter(model.parameters()), None)
    if param is not None and (param.dtype != torch.float32 or param.device.type != "cpu"):
        return copy.deepcopy(model).float().cpu()
    return model


def _check_file(result: ExportResult, staging: Path, model: nn.Module,
                dynamic_size: Optional[bool], **parity_options) -> Optional[str]:
    """Parity of the written file into ``result.parity``. Where its symbolic spatial size was
    picked (not asked for) and the file fails in any way: why, in words (the caller writes a
    fixed-size file instead); otherwise None, or the parity error raised."""
    picked = result.dynamic_size and dynamic_size is None
    try:
        result.parity = check_parity(staging, model, **parity_options)
    except ParityError as exc:  # e.g. onnxruntime cannot load the symbolic-size graph
        if not picked:
            raise
        return str(exc).strip().splitlines()[0][:300]
    return _failing_case(result.parity) if picked else None


def _failing_case(report: ParityReport) -> Optional[str]:
    """The first failing run of ``report``, in words; None where parity passed."""
    bad = report.failing()
    if not bad:
        return None
    c = bad[0]
    return (f"at {'x'.join(map(str, c.shape))} ({c.source} input): "
            f"{c.error or f'max_rel_err {c.max_rel_err:.1e}'}")


def _fixed_size_note(why: str) -> str:
    return (f"the graph with a symbolic spatial size failed the parity check ({why}): the "
            "exporter wrote some layer of the model for one size only, so this file has a "
            "fixed spatial size")


def _publish(staging: Path, path: Path) -> None:
    """Move a file that passed parity (and its external data, if any) to ``path``."""
    data = staging.with_name(staging.name + ".data")
    try:
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(staging, path)
    except OSError as exc:  # e.g. a folder made read-only meanwhile
        raise write_error(path, exc) from None


def _keep_failed(staging: Path, path: Path) -> Path:
    """Keep a file that failed parity beside ``path`` (which is left as it was):
    ``NAME.parity-failed.onnx``, or with external data the folder ``NAME.parity-failed/``
    holding ``NAME.onnx`` and its ``.data`` (the file refers to its data by name)."""
    if staging.with_name(staging.name + ".data").exists():
        folder = path.with_name(path.stem + ".parity-failed")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging.parent, folder)
        return folder / path.name
    failed = path.with_name(path.stem + ".parity-failed.onnx")
    os.replace(staging, failed)
    return failed
