"""export_onnx: a converted model -> one ONNX file in the chosen SBN form, with parity proven."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import ExportError
from . import graph
from .prepare import MODES, SiteExport, export_sites, prepare_export_model
from ..progress import ProgressFn

__all__ = ["export_onnx", "ExportResult", "SiteExport", "MODES", "DEFAULT_OPSET", "MIN_OPSET",
           "prepare_export_model"]

DEFAULT_OPSET = 20
#: ONNX DFT exists from opset 17, but torch.onnx writes opset 18 and newer only: its down-converter
#: fails on Pad and ReduceMean, so opset 17 is refused up front rather than half-written.
MIN_OPSET = 18



@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how parity came out."""

    path: Path
    mode: str
    opset: int
    input_size: tuple[int, int, int]
    dynamic_batch: bool
    dynamic_size: bool
    sites: list[SiteExport] = field(default_factory=list)
    size_bytes: int = 0
    parity: Any = None  # sbn_surgery.parity.ParityReport, or None when parity=False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": str(self.path),
            "mode": self.mode,
            "opset": self.opset,
            "parity": self.parity.summary() if self.parity is not None else None,
            "input_size": list(self.input_size),
            "dynamic_batch": self.dynamic_batch,
            "dynamic_size": self.dynamic_size,
            "size_bytes": self.size_bytes,
            "notes": list(self.notes),
            "sites": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
                      for s in self.sites],
        }


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def _resolve_input_size(model: nn.Module, input_size) -> tuple[int, int, int]:
    if input_size is None:
        meta = getattr(model, "sbn_meta", None) or {}
        if meta.get("input_size"):
            input_size = meta["input_size"]
        else:
            from ..models import input_size_of

            input_size = input_size_of(model)
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ExportError(f"input size must be three positive ints C H W; got {input_size!r}")
    return size  # type: ignore[return-value]


def _stat_size(model: nn.Module, site) -> Optional[tuple[int, int]]:
    sbn = model.get_submodule(site.module)
    return getattr(sbn, "spatial_size", None)


def _same_padding_layers(model: nn.Module) -> list[str]:
    """Layers that compute their padding from the input size at run time (timm's Conv2dSame,
    MaxPool2dSame, AvgPool2dSame: TensorFlow 'SAME' padding). With a symbolic spatial size
    torch.export builds nested ceil/max expressions for each of them, which takes minutes."""
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("Same")]


def _resolve_dynamic_size(dynamic_size: Optional[bool], mode: str, records: list[SiteExport],
                          model: nn.Module) -> bool:
    fixed = [r for r in records if r.stats == "frequency"]
    if dynamic_size is None:
        return mode != "matmul" and not fixed and not _same_padding_layers(model)
    if dynamic_size and fixed:
        r = fixed[0]
        raise ExportError(
            f"{r.module} uses frequency-mode statistics, which belong to one spatial size "
            f"({r.spatial_size[0]}x{r.spatial_size[1]} here), so the file cannot accept any "
            "spatial size. Export with a fixed size (drop --dynamic-size), at the input size the "
            "model was calibrated for."
        )
    if dynamic_size and mode == "matmul":
        raise ExportError(
            "matmul mode writes the DFT as constant matrices for one spatial size, so it cannot "
            "accept any spatial size; use --mode fold or --mode dft for a size-independent "
            "channel-mode file, or drop --dynamic-size."
        )
    return bool(dynamic_size)


def _metadata(model: nn.Module, mode: str, opset: int, input_size, dynamic_batch: bool,
              dynamic_size: bool, records: list[SiteExport]) -> dict[str, Any]:
    from .._version import __version__

    meta = getattr(model, "sbn_meta", None) or {}
    name = meta.get("model_name") or getattr(model, "default_cfg", {}).get("architecture") \
        or type(model).__name__
    return {
        "version": __version__,
        "mode": mode,
        "opset": opset,
        "model_name": str(name),
        "recipe": meta.get("recipe"),
        "recipe_name": meta.get("recipe_name"),
        "input_size": list(input_size),
        "dynamic_batch": dynamic_batch,
        "dynamic_size": dynamic_size,
        "sites": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r).items()}
                  for r in records],
    }


def _torch_export(work: nn.Module, example: Tensor, opset: int, dynamic_shapes) -> Any:
    try:
        # stdout belongs to the CLI's --json; the exporter's own chatter is dropped
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.onnx.export(work, (example,), dynamo=True, opset_version=opset,
                                     dynamic_shapes=dynamic_shapes, input_names=["input"],
                                     verbose=False, external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx.export (dynamo) failed for this model at opset {opset}: "
            f"{type(exc).__name__}: {first[:400]}. Try a fixed size (--fixed-size), --static, or "
            "another --opset."
        ) from exc


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
    back to a fixed size, with a note in ``result.notes``, when the parity check at a second
    size shows that the exporter wrote some layer for one size only (e.g. adaptive pooling that
    upsamples); True where impossible (frequency statistics, matmul mode) is an
    :class:`ExportError`.
    ``layout``: the matmul form's layout (``auto``, ``dense``, ``separable``).

    The caller's model is not modified. Unless ``parity=False``, the file is run with
    onnxruntime on random inputs (and ``images``) at batch sizes ``parity_batches`` and compared
    with the model in eval mode before it is moved to ``path``; a failure raises
    ``sbn_surgery.parity.ParityFailed`` (a ``ParityError``), leaves whatever was at ``path`` as it
    was, and keeps the failing file beside it as ``NAME.parity-failed.onnx`` for inspection.
    """
    if images is not None and parity:  # once: the fixed-size fallback runs parity again
        from ..parity.check import stack_images

        images = stack_images(images)
    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")
    max_opset = _max_opset()
    if not MIN_OPSET <= int(opset) <= max_opset:
        raise ExportError(
            f"opset {opset} is not supported: use {MIN_OPSET} (the oldest torch.onnx writes; DFT "
            f"exists from 17) to {max_opset} (the newest this onnx knows); the default is "
            f"{DEFAULT_OPSET}."
        )
    if rtol is not None and not (math.isfinite(rtol) and rtol > 0):
        raise ExportError(f"--rtol must be a finite number > 0; got {rtol}. Leave it out for the "
                          "default, sized by the export mode.")
    if not 0 <= min_top1 <= 1:
        raise ExportError(f"--min-top1 must be in [0, 1]; got {min_top1}")
    if not dynamic_batch and batch_size < 1:
        raise ExportError(f"batch size must be at least 1; got {batch_size}")
    path = Path(path)
    if path.is_dir():  # found now, not after the slow trace
        raise ExportError(f"{path} is a directory; give the .onnx file to write, e.g. "
                          f"{path / 'model.onnx'}")
    if path.suffix.lower() != ".onnx":
        raise ExportError(f"output file {path} should end in .onnx")
    size = _resolve_input_size(model, input_size)
    if parity and images is not None and tuple(images.shape[1:]) != tuple(size):  # before writing
        raise ExportError(f"parity images have shape {tuple(images.shape)}; the export takes "
                          f"(N, {', '.join(map(str, size))}). Resize them to the input size.")

    def step(i: int, info: str) -> None:
        if progress is not None:
            progress("export", i, 4, info)

    step(0, "preparing")
    # options that cannot work are refused before the (slow) copy and probe
    _resolve_dynamic_size(dynamic_size, mode, [SiteExport(s.module, s.stats, "?", _stat_size(model, s))
                                               for s in export_sites(model)], model)
    work, records = prepare_export_model(model, mode, size, layout=layout)
    dyn_size = _resolve_dynamic_size(dynamic_size, mode, records, work)
    step(1, "tracing")
    from torch.export import Dim

    batch = 2 if dynamic_batch else int(batch_size)
    example = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
    axes: dict[int, Any] = {}
    if dynamic_batch:
        axes[0] = Dim.AUTO
    if dyn_size:
        axes[2] = axes[3] = Dim.AUTO
    program = _torch_export(work, example, int(opset), (axes,) if axes else None)
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != int(opset):
        raise ExportError(
            f"the exporter wrote opset {got} instead of {opset} (it could not convert the graph); "
            f"use --opset 18 or later."
        )
    step(2, "writing")
    graph.drop_inferred_shapes(proto)
    dynamic = graph.name_dims(proto, {0: "batch", 2: "height", 3: "width"})
    if dynamic_batch and not dynamic.get(0):
        raise ExportError("the model fixes its batch size during export; use --static")
    if dynamic_size and not (dynamic.get(2) and dynamic.get(3)):
        raise ExportError(
            "the model fixes its spatial size during export (some layer depends on it), so the "
            "file cannot accept any size; drop --dynamic-size."
        )
    dyn_size = bool(dynamic.get(2) and dynamic.get(3))
    site_dicts = [asdict(r) for r in records]
    graph.name_sbn_nodes(proto, site_dicts)
    for rec, d in zip(records, site_dicts):
        rec.output, rec.inputs, rec.nodes = d.get("output"), d.get("inputs", []), d.get("nodes", 0)
    graph.set_metadata(proto, _metadata(model, mode, int(opset), size, dynamic_batch, dyn_size,
                                        records))
    proto.doc_string = (f"{graph.read_metadata(proto)['model_name']} with {len(records)} "
                        f"SpectralBatchNorm2d layer(s), exported by sbn-surgery in {mode} mode")
    if not parity:
        written = graph.save_model(proto, path)
    else:  # written beside the path and checked there; moved to the path only once it passes
        staging = _staging_path(path)
        written = graph.save_model(proto, staging)
    result = ExportResult(path=path, mode=mode, opset=int(opset), input_size=size,
                          dynamic_batch=dynamic_batch, dynamic_size=dyn_size, sites=records,
                          size_bytes=written)
    if parity:
        step(3, "parity")
        from ..parity import ParityFailed, check_parity

        ref = model
        param = next(iter(model.parameters()), None)
        if param is not None and (param.dtype != torch.float32 or param.device.type != "cpu"):
            # the file computes in float32 on the CPU; so does the reference (on CUDA, TF32
            # convolutions alone would differ by about 1e-3)
            ref = copy.deepcopy(model).float().cpu()
        try:
            report = check_parity(staging, ref, images=images, rtol=rtol, min_top1=min_top1,
                                  batch_sizes=parity_batches, input_size=size)
            result.parity = report
            bad = report.failing()
            if bad and dyn_size and dynamic_size is None and \
                    all(c.source == "other-size" for c in bad):
                # the symbolic-size graph only holds at the export size (e.g. adaptive pooling
                # written for one size): write a fixed-size file instead, and say so
                shutil.rmtree(staging.parent, ignore_errors=True)
                c = bad[0]
                fixed = export_onnx(model, path, mode, opset, size, dynamic_batch,
                                    dynamic_size=False, batch_size=batch_size, layout=layout,
                                    parity=True, images=images, rtol=rtol, min_top1=min_top1,
                                    parity_batches=parity_batches, progress=progress)
                fixed.notes.insert(0, (
                    f"the graph with a symbolic spatial size did not match PyTorch at "
                    f"{'x'.join(map(str, c.shape[1:]))} ({c.error or f'max_rel_err {c.max_rel_err:.1e}'}): "
                    "some layer of the model was exported for one size only, so this file has a "
                    "fixed spatial size"))
                return fixed
            if not report.passed:
                raise ParityFailed(report, _keep_failed(staging, path), target=path)
            _publish(staging, path)
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
    step(4, "done")
    return result


def _staging_path(path: Path) -> Path:
    """``path``'s name in a fresh hidden folder beside it (same file system, so the move is a
    rename; an external-data file keeps the name its ``.onnx`` refers to)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".parity", dir=path.parent)) / path.name


def _publish(staging: Path, path: Path) -> None:
    """Move a file that passed parity (and its external data, if any) to ``path``."""
    data = staging.with_name(staging.name + ".data")
    if data.exists():
        os.replace(data, path.with_name(path.name + ".data"))
    os.replace(staging, path)


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


def _max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())
