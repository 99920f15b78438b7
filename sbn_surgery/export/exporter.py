"""Writing one ONNX file: a converted model -> its export-ready copy -> traced graph -> named,
annotated file. Options are checked before the slow work (:func:`check_export_options`), then
:func:`write_onnx` prepares, traces and finalizes. The parity check is not here: the caller
composes it (``sbn_surgery.export_onnx``)."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2dSame
from torch import Tensor, nn

from .._version import __version__
from ..errors import ExportError
from ..models import imagenet_labels, input_size_of
from ..onnx_io import DEFAULT_OPSET, MIN_OPSET, set_onnx_metadata
from ..progress import ProgressFn
from . import graph
from .prepare import MODES, SiteExport, export_sites, prepare_export_model

__all__ = ["write_onnx", "check_export_options", "ExportPlan", "ExportResult", "SiteExport", "MODES",
           "DEFAULT_OPSET", "MIN_OPSET", "EXPORT_STEPS", "WRITE_STEPS", "prepare_export_model"]


@dataclass
class ExportResult:
    """What :func:`write_onnx` wrote, and how parity came out where the caller checked it."""

    path: Path
    mode: str
    opset: int
    input_size: tuple[int, int, int]
    dynamic_batch: bool
    dynamic_size: bool
    sites: list[SiteExport] = field(default_factory=list)
    size_bytes: int = 0
    parity: Any = None  # a ParityReport where the caller checked parity, else None
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


def _resolve_input_size(model: nn.Module, input_size) -> tuple[int, int, int]:
    if input_size is None:
        meta = getattr(model, "sbn_meta", None) or {}
        if meta.get("input_size"):
            input_size = meta["input_size"]
        else:
            input_size = input_size_of(model)
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ExportError(f"input size must be three positive ints C H W; got {input_size!r}")
    return size  # type: ignore[return-value]


#: timm's layers with TensorFlow 'SAME' padding, computed from the input size at run time.
_SAME_PADDING = (Conv2dSame, StdConv2dSame, ScaledStdConv2dSame, AvgPool2dSame, MaxPool2dSame)


def _same_padding_layers(model: nn.Module) -> list[str]:
    """Layers that compute their padding from the input size at run time (timm's Conv2dSame,
    MaxPool2dSame, AvgPool2dSame, ...: TensorFlow 'SAME' padding). With a symbolic spatial size
    torch.export builds nested ceil/max expressions for each of them, which takes minutes."""
    return [n for n, m in model.named_modules() if isinstance(m, _SAME_PADDING)]


def _frequency_sites(model: nn.Module) -> list[tuple[str, Optional[tuple[int, int]]]]:
    """(module path, spatial size of its statistics) of each frequency-mode SBN."""
    return [(s.module, getattr(model.get_submodule(s.module), "spatial_size", None))
            for s in export_sites(model) if s.stats == "frequency"]


def _refuse_dynamic_size(dynamic_size: Optional[bool], mode: str,
                         fixed: list[tuple[str, Optional[tuple[int, int]]]]) -> None:
    """A symbolic spatial size asked for where the file can only hold one size."""
    if not dynamic_size:
        return
    if fixed:
        module, hw = fixed[0]
        raise ExportError(
            f"{module} uses frequency-mode statistics, which belong to one spatial size "
            f"({hw[0]}x{hw[1]} here), so the file cannot accept any "
            "spatial size. Export with a fixed size (drop --dynamic-size), at the input size the "
            "model was calibrated for."
        )
    if mode == "matmul":
        raise ExportError(
            "matmul mode writes the DFT as constant matrices for one spatial size, so it cannot "
            "accept any spatial size; use --mode fold or --mode dft for a size-independent "
            "channel-mode file, or drop --dynamic-size."
        )


def _pick_dynamic_size(dynamic_size: Optional[bool], mode: str, has_fixed: bool,
                       model: nn.Module) -> bool:
    """``dynamic_size``, or where it is None whether a symbolic spatial size is possible."""
    if dynamic_size is None:
        return mode != "matmul" and not has_fixed and not _same_padding_layers(model)
    return bool(dynamic_size)


def serving_metadata(model: nn.Module, input_size) -> dict[str, Any]:
    """What serving needs (``data_config``, ``classes``, ``classes_source``): timm's eval data
    config for the model at the export's input size, with the preprocessing and class names
    its checkpoint stores (``sbn_meta["pretrained_cfg"]``: fine-tuning records what its
    validation did and its data's class names; converting records the weights' own) taking
    precedence; without stored names, timm's label names where the class count is one of its
    ImageNet label sets, else the indices. Checked: a checkpoint's metadata is untrusted."""
    from ..data import data_config_for
    from ..data.transforms import fit_channels
    from ..pretrained_cfg import EVAL_KEYS
    from ..serving.metadata import check_classes, check_data_config

    meta = getattr(model, "sbn_meta", None) or {}
    stored = meta.get("pretrained_cfg") if isinstance(meta.get("pretrained_cfg"), dict) else {}
    outputs = getattr(model, "num_classes", None) or None
    where = f"the model's stored preprocessing ({meta.get('model_name', 'model')})"
    cfg = dict(data_config_for(model, tuple(input_size)))
    cfg.update({k: stored[k] for k in EVAL_KEYS if k in stored and k != "input_size"})
    cfg = fit_channels(cfg)  # a 1-channel model of 3-channel weights: one mean, one std
    names = stored.get("label_names")
    timm_labels = imagenet_labels(model)
    if names is not None and (outputs is None or len(names) == outputs) and \
            not (timm_labels and list(names) == timm_labels[0]):
        classes, source = check_classes(names, where, outputs), "checkpoint (label_names)"
    elif timm_labels and (outputs is None or len(timm_labels[1]) == outputs):
        classes, source = timm_labels[1], "timm label set"  # readable, not WordNet ids
    else:
        classes, source = [str(i) for i in range(int(outputs or 0))] or None, "indices"
    data_config = check_data_config(cfg, where).to_json()
    return {"data_config": data_config, "classes": classes, "classes_source": source}


def _metadata(model: nn.Module, plan: ExportPlan, dynamic_size: bool,
              records: list[SiteExport]) -> dict[str, Any]:
    meta = getattr(model, "sbn_meta", None) or {}
    name = meta.get("model_name") or getattr(model, "default_cfg", {}).get("architecture") \
        or type(model).__name__
    return {
        **plan.serving,
        "version": __version__,
        "mode": plan.mode,
        "opset": plan.opset,
        "model_name": str(name),
        "recipe": meta.get("recipe"),
        "recipe_name": meta.get("recipe_name"),
        "input_size": list(plan.size),
        "dynamic_batch": plan.dynamic_batch,
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


#: The steps :func:`write_onnx` reports through ``progress("export", i, EXPORT_STEPS, info)``; a
#: caller that goes on (the parity check) reports the steps after ``WRITE_STEPS``.
EXPORT_STEPS = 4
WRITE_STEPS = 3


@dataclass
class ExportPlan:
    """The checked options of one export (from :func:`check_export_options`)."""

    path: Path
    mode: str
    opset: int
    size: tuple[int, int, int]
    dynamic_batch: bool
    dynamic_size: Optional[bool]
    batch_size: int
    fixed: list[tuple[str, Optional[tuple[int, int]]]]
    serving: dict[str, Any] = field(default_factory=dict)  # serving_metadata(), checked


def check_export_options(model: nn.Module, path: Union[str, Path], mode: str, opset: int,
                         input_size: Optional[tuple[int, int, int]], dynamic_batch: bool,
                         dynamic_size: Optional[bool], batch_size: int) -> ExportPlan:
    """Refuse options that cannot work before the slow copy, probe and trace; the input size
    resolved (``input_size``, else ``model.sbn_meta``, else timm's)."""
    if mode not in MODES:
        raise ExportError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")
    max_opset = _max_opset()
    if not MIN_OPSET <= int(opset) <= max_opset:
        raise ExportError(
            f"opset {opset} is not supported: use {MIN_OPSET} (the oldest torch.onnx writes; DFT "
            f"exists from 17) to {max_opset} (the newest this onnx knows); the default is "
            f"{DEFAULT_OPSET}."
        )
    if not dynamic_batch and batch_size < 1:
        raise ExportError(f"batch size must be at least 1; got {batch_size}")
    path = Path(path)
    if path.is_dir():  # found now, not after the slow trace
        raise ExportError(f"{path} is a directory; give the .onnx file to write, e.g. "
                          f"{path / 'model.onnx'}")
    if path.suffix.lower() != ".onnx":
        raise ExportError(f"output file {path} should end in .onnx")
    size = _resolve_input_size(model, input_size)
    serving = serving_metadata(model, size)  # a bad recorded data config fails before the trace
    return ExportPlan(path, mode, int(opset), size, dynamic_batch,
                      dynamic_size, int(batch_size), _frequency_sites(model), serving)


def _trace(work: nn.Module, plan: ExportPlan, dyn_size: bool) -> Any:
    """The exported ModelProto of the export-ready copy, at the opset asked for."""
    from torch.export import Dim

    batch = 2 if plan.dynamic_batch else plan.batch_size
    example = torch.randn(batch, *plan.size, generator=torch.Generator().manual_seed(0))
    axes: dict[int, Any] = {}
    if plan.dynamic_batch:
        axes[0] = Dim.AUTO
    if dyn_size:
        axes[2] = axes[3] = Dim.AUTO
    proto = _torch_export(work, example, plan.opset, (axes,) if axes else None).model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != plan.opset:
        raise ExportError(
            f"the exporter wrote opset {got} instead of {plan.opset} (it could not convert the "
            "graph); use --opset 18 or later."
        )
    return proto


def _finalize(proto: Any, model: nn.Module, plan: ExportPlan, records: list[SiteExport]) -> bool:
    """Name the symbolic dims and the SBN nodes, record each site's graph tensors, write the
    metadata. Returns whether the file has a symbolic spatial size."""
    graph.drop_inferred_shapes(proto)
    dynamic = graph.name_dims(proto, {0: "batch", 2: "height", 3: "width"})
    if plan.dynamic_batch and not dynamic.get(0):
        raise ExportError("the model fixes its batch size during export; use --static")
    if plan.dynamic_size and not (dynamic.get(2) and dynamic.get(3)):
        raise ExportError(
            "the model fixes its spatial size during export (some layer depends on it), so the "
            "file cannot accept any size; drop --dynamic-size."
        )
    dyn_size = bool(dynamic.get(2) and dynamic.get(3))
    site_dicts = [asdict(r) for r in records]
    graph.name_sbn_nodes(proto, site_dicts)
    for rec, d in zip(records, site_dicts):
        rec.output, rec.inputs, rec.nodes = d.get("output"), d.get("inputs", []), d.get("nodes", 0)
    meta = _metadata(model, plan, dyn_size, records)
    set_onnx_metadata(proto, meta)
    proto.doc_string = (f"{meta['model_name']} with {len(records)} SpectralBatchNorm2d layer(s), "
                        f"exported by sbn-surgery in {plan.mode} mode")
    return dyn_size


def write_onnx(model: nn.Module, plan: ExportPlan, target: Union[str, Path], *, layout: str = "auto",
               progress: Optional[ProgressFn] = None) -> ExportResult:
    """Trace the export-ready copy of ``model`` for ``plan`` (from :func:`check_export_options`)
    and write it to ``target`` (atomically); ``result.path`` is ``plan.path``. The caller's model
    is not modified. No parity check: ``sbn_surgery.export_onnx`` composes this with one."""

    def step(i: int, info: str) -> None:
        if progress is not None:
            progress("export", i, EXPORT_STEPS, info)

    step(0, "preparing")
    _refuse_dynamic_size(plan.dynamic_size, plan.mode, plan.fixed)
    work, records = prepare_export_model(model, plan.mode, plan.size, layout=layout)
    dyn_size = _pick_dynamic_size(plan.dynamic_size, plan.mode, bool(plan.fixed), work)
    step(1, "tracing")
    proto, notes = _trace_or_fall_back(work, plan, dyn_size)
    step(2, "writing")
    dyn_size = _finalize(proto, model, plan, records)
    written = graph.save_model(proto, target)
    return ExportResult(path=plan.path, mode=plan.mode, opset=plan.opset, input_size=plan.size,
                        dynamic_batch=plan.dynamic_batch, dynamic_size=dyn_size, sites=records,
                        size_bytes=written, notes=notes)


def _fused_attention(work: nn.Module) -> list[nn.Module]:
    """timm's attention modules that call torch's fused scaled_dot_product_attention."""
    return [m for m in work.modules() if getattr(m, "fused_attn", False) is True]


def _trace_or_fall_back(work: nn.Module, plan: ExportPlan, dyn_size: bool) -> tuple[Any, list]:
    """The traced ModelProto, and notes. Where torch.onnx fails: again with timm's attention
    computed explicitly (``fused_attn = False``: the same ops, as ONNX at these opsets has no
    fused attention; torch cannot decompose the fused one with a bias mask, as in BEiT); then,
    where the symbolic spatial size was picked rather than asked for, at the export size."""
    try:
        return _trace(work, plan, dyn_size), []
    except ExportError as exc:
        first = exc
    fused = _fused_attention(work)
    for module in fused:
        module.fused_attn = False
    if fused:
        try:
            return _trace(work, plan, dyn_size), []
        except ExportError:
            pass
    if not (dyn_size and plan.dynamic_size is None):
        raise first
    return _trace(work, plan, False), [_fixed_trace_note(first, plan.size)]


def _fixed_trace_note(exc: ExportError, size: tuple[int, int, int]) -> str:
    reason = str(exc).split(". Try a fixed size", 1)[0]
    return (f"the exporter could not write the graph with a symbolic spatial size ({reason}), "
            f"so this file takes {size[1]}x{size[2]} inputs only; resize images to it.")


def _max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())
