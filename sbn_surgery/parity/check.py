"""onnxruntime sessions: parity of an exported file with PyTorch, and latency.

Parity runs the file and the PyTorch model (eval mode, float32) on the same inputs: random
normal images at batch 1 and a batch larger than 1, plus real images when given. It reports

* ``max_abs_err``: max |onnx - torch| over every output value;
* ``max_rel_err``: max |onnx - torch| / max |torch|, per run, the largest over runs (error
  relative to the output's scale, so near-zero logits do not inflate it);
* ``top1_agreement``: the share of samples whose arg-max over the output agrees;
* ``passed``: ``max_rel_err <= rtol`` and ``top1_agreement >= min_top1``.

The default ``rtol`` is sized by the transform the file uses and its length L = H*W (the largest
SBN feature map): no transform (fold, channel mode) 1e-5; constant-matrix DFT (matmul mode, and
frequency mode in fold mode), whose rounding error grows like sqrt(L), 1e-5 * max(1, sqrt(L/256));
DFT nodes, whose error grows like log2(L) for fast transforms but which runtimes compute with
float32 twiddles, 1e-4 * max(1, log2(L)/12).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ParityError
from ..layers import channel_shape
from ..onnx_io import load_onnx, read_onnx_metadata, with_extra_outputs
from .reports import LayerParity, ParityCase, ParityReport
from .runtime import check_numel, image_input_dims, input_chw, session

__all__ = ["check_parity", "check_tolerances", "default_rtol", "stack_images"]


def stack_images(images: Union[Tensor, Iterable[Tensor]]) -> Tensor:
    """One float tensor of images from a tensor or batches (tensors or (images, labels))."""
    if isinstance(images, Tensor):
        return images.float()
    parts = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
    if not parts:
        raise ParityError("no images given for the parity check")
    return torch.cat([p.float() for p in parts])


def _inputs(dims, size, batch_sizes, images, seed) -> list[tuple[str, Tensor]]:
    """(source, batch) pairs: random inputs at each batch size; then the real images, the first
    one alone and the rest in batches of the largest size (the fixed size of a static file)."""
    static_batch = dims[0]
    sizes = [static_batch] * 2 if static_batch is not None else list(batch_sizes)
    g = torch.Generator().manual_seed(seed)
    runs = [("random", torch.randn(b, *size, generator=g)) for b in sizes]
    if images is not None:
        data = stack_images(images)
        if tuple(data.shape[1:]) != tuple(size):
            raise ParityError(
                f"parity images have shape {tuple(data.shape)}; the file takes (N, "
                f"{', '.join(map(str, size))}). Resize them to the export input size."
            )
        start = 0
        if static_batch is None:
            runs.append(("images", data[:1]))
            start = 1
        step = static_batch or max(sizes)
        while start + (step if static_batch else 1) <= data.shape[0]:
            runs.append(("images", data[start:start + step]))
            start += step
    return runs


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, int]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    abs_err = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = abs_err / scale if scale > 0 else abs_err
    n = ref.shape[0]
    agree = int((ref.reshape(n, -1).argmax(1) == got.reshape(n, -1).argmax(1)).sum())
    return abs_err, rel, agree


def default_rtol(mode: str, sites: Sequence[dict]) -> float:
    """The tolerance on max_rel_err for a file, from its mode and its longest transform (in
    fold mode only the layers written in matmul form have one)."""
    pixels = max((s["spatial_size"][0] * s["spatial_size"][1] for s in sites
                  if s.get("spatial_size") and (mode != "fold" or s.get("form") == "matmul")),
                 default=1)
    if mode == "dft":
        return 1e-4 * max(1.0, math.log2(max(pixels, 2)) / 12.0)
    if mode == "matmul" or any(s.get("form") == "matmul" for s in sites):
        return 1e-5 * max(1.0, math.sqrt(pixels / 256.0))
    return 1e-5


def check_tolerances(rtol: Optional[float], min_top1: float) -> None:
    """``rtol`` finite and > 0 (None: the default), ``min_top1`` in [0, 1]."""
    if rtol is not None and not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ParityError(f"--rtol must be a finite number > 0; got {rtol}. Leave it out for the "
                          "default, sized by the export mode.")
    if not (isinstance(min_top1, (int, float)) and 0 <= min_top1 <= 1):
        raise ParityError(f"--min-top1 must be in [0, 1]; got {min_top1}")


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def check_parity(
    onnx_path: Union[str, Path],
    model: nn.Module,
    *,
    images: Optional[Union[Tensor, Iterable[Tensor]]] = None,
    batch_sizes: Sequence[int] = (1, 3),
    input_size: Optional[tuple[int, int, int]] = None,
    rtol: Optional[float] = None,
    min_top1: float = 1.0,
    per_layer: bool = False,
    other_sizes: Optional[Sequence[tuple[int, int]]] = None,
    seed: int = 0,
) -> ParityReport:
    """Run ``onnx_path`` with onnxruntime and ``model`` in eval mode on the same inputs and
    compare (see the module docstring). ``per_layer=True`` also compares every SBN layer
    (exposed as extra graph outputs, against forward hooks) on the largest random batch, in
    graph order: the error at its input and output, and its own error (see
    :class:`LayerParity`); ``first_bad_layer`` is the first whose own error exceeds ``rtol``,
    i.e. where the error starts. A file with a symbolic spatial size is also run at
    ``other_sizes`` (H, W) (default: 32 more pixels each way, which keeps every stride's
    divisibility), so a graph that only works at its export size is caught; sizes PyTorch cannot
    run are skipped with a note. The model's train/eval flags are restored afterwards."""
    check_tolerances(rtol, min_top1)
    proto = load_onnx(onnx_path)
    meta = read_onnx_metadata(proto)
    dims = image_input_dims(proto, onnx_path)
    size = input_chw(dims, meta, input_size, onnx_path)
    sites = meta.get("sites") or []
    tol = float(rtol) if rtol is not None else default_rtol(meta.get("mode", "fold"), sites)
    if min(batch_sizes, default=0) < 1:
        raise ParityError(f"batch sizes must be positive; got {list(batch_sizes)}")
    check_numel((dims[0] or max(batch_sizes), *size), onnx_path)
    sess = session(onnx_path)
    name = sess.get_inputs()[0].name
    runs = _inputs(dims, size, batch_sizes, images, seed)
    if dims[2] is None and dims[3] is None:
        extra = other_sizes if other_sizes is not None else [(size[1] + 32, size[2] + 32)]
        g = torch.Generator().manual_seed(seed + 1)
        batch = dims[0] or max(batch_sizes)
        runs += [("other-size", torch.randn(batch, size[0], *hw, generator=g)) for hw in extra]

    flags = {m: m.training for m in model.modules()}
    device, dtype = _device_dtype(model)
    layers = first_bad = None
    try:
        model.eval()
        cases, notes = _run_cases(sess, name, model, runs, device, dtype)
        if per_layer:
            big = max((x for s, x in runs if s == "random"), key=lambda t: t.shape[0])
            layers = _per_layer(proto, model, sites, big, name, tol, device)
            first_bad = next((lay.module for lay in layers if lay.passed is False), None)
    finally:
        for m, flag in flags.items():
            m.train(flag)
    n_total = sum(c.shape[0] for c in cases)
    top1 = sum(c.top1_agreement * c.shape[0] for c in cases) / n_total
    abs_max = max(c.max_abs_err for c in cases)
    rel_max = max(c.max_rel_err for c in cases)
    passed = rel_max <= tol and top1 >= min_top1 and math.isfinite(rel_max)
    return ParityReport(max_abs_err=abs_max, max_rel_err=rel_max, top1_agreement=top1,
                        passed=passed, rtol=tol, min_top1=min_top1, cases=cases, layers=layers,
                        first_bad_layer=first_bad, notes=notes)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(iter(model.parameters()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def _run_cases(sess, input_name: str, model: nn.Module, runs: list[tuple[str, Tensor]], device,
               dtype) -> tuple[list[ParityCase], list[str]]:
    """Run the file and the model (in eval mode) on each input: one :class:`ParityCase` per run,
    and notes on the second sizes PyTorch itself cannot run."""
    cases, notes = [], []
    for source, x in runs:
        shape = tuple(x.shape)
        try:
            with torch.no_grad():
                ref = _outputs(model, x.to(device=device, dtype=dtype))
        except Exception as exc:  # noqa: BLE001 - a size the model itself cannot take
            if source != "other-size":
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ParityError(
                    f"the PyTorch model does not run on input {'x'.join(map(str, shape))} "
                    f"({first[:200]}); check --input-size against the size it was "
                    "converted and exported at"
                ) from None
            notes.append(f"PyTorch cannot run the model at {'x'.join(map(str, shape))} "
                         f"({type(exc).__name__}); that size was not checked")
            continue
        ref_np = ref.detach().float().cpu().numpy()
        try:
            got = sess.run(None, {input_name: x.numpy()})[0]
            if got.shape != ref_np.shape:
                raise ValueError(f"output shape {got.shape}, PyTorch's {ref_np.shape}")
        except Exception as exc:  # noqa: BLE001 - record it as a failed run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            cases.append(ParityCase(source, shape, math.inf, math.inf, 0.0, error=first[:300]))
            continue
        abs_err, rel, agree = _compare(ref_np, got)
        cases.append(ParityCase(source, shape, abs_err, rel, agree / x.shape[0]))
    return cases, notes


def _per_layer(proto, model: nn.Module, sites: list[dict], x: Tensor, input_name: str, tol: float,
               device) -> list[LayerParity]:
    """Compare each SBN layer's input and output in the file with the model's (forward hooks),
    and the layer's own error: its output in the file against the PyTorch layer (float64) applied
    to the input the file gave it, so upstream differences do not count against it."""
    if not sites:
        raise ParityError(
            "per-layer parity needs the SBN sites recorded at export; this file has no "
            "sbn-surgery metadata (was it written by `sbn-surgery export`?)"
        )
    wanted = [o for s in sites for o in [s.get("output"), *(s.get("inputs") or [])] if o]
    extra = with_extra_outputs(proto, wanted)
    sess = session(extra.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for s in sites:
        try:
            mod = model.get_submodule(s["module"])
        except AttributeError:
            raise ParityError(
                f"the model has no module {s['module']}, which the ONNX file has as an SBN layer; "
                "is CHECKPOINT the model this file was exported from?"
            ) from None

        def hook(m, args, out, key=s["module"]):
            # clone: the network may update these tensors in place later (x += shortcut)
            captured[key] = (args[0].detach().double().cpu().clone(), out.detach().double().cpu().clone())
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            param = next(iter(model.parameters()), None)
            model(x.to(device=device, dtype=param.dtype if param is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
    results = dict(zip(names, sess.run(None, {input_name: x.numpy()})))
    return [_layer_parity(s, model, captured.get(s["module"]), results, tol) for s in sites]


def _rel(a: Tensor, b: Tensor, scale: Tensor) -> tuple[float, float]:
    err = float((a - b).abs().max()) if a.numel() else 0.0
    ref = float(scale.abs().max()) if scale.numel() else 0.0
    return err, (err / ref if ref > 0 else err)


def _layer_parity(site: dict, model: nn.Module, ref: Optional[tuple[Tensor, Tensor]],
                  results: dict, tol: float) -> LayerParity:
    row = LayerParity(site["module"], site["stats"], site["form"], site.get("output"),
                      None, None, None, None, None)
    out = results.get(site.get("output") or "")
    if ref is None or out is None or tuple(out.shape) != tuple(ref[1].shape):
        return row
    torch_in, torch_out = ref
    got_out = torch.from_numpy(out).double()
    row.max_abs_err, row.max_rel_err = _rel(got_out, torch_out, torch_out)
    layer = copy.deepcopy(model.get_submodule(site["module"])).double().cpu().eval()
    # the input the file gave the layer: the entering tensor of the layer's input shape; where
    # the scale was folded into the BatchNorm in front, that tensor is the input times the scale
    scale = None
    if site.get("folded_into"):
        scale = layer.channel_constants()[0].view(
            channel_shape(getattr(layer, "layout", "nchw"), layer.num_features))
    for name in site.get("inputs") or []:
        got_in = results.get(name)
        if got_in is None or tuple(got_in.shape) != tuple(torch_in.shape):
            continue
        got_in = torch.from_numpy(got_in).double()
        if scale is not None:
            # A channel whose scale is 0 (e.g. a zero-initialized gamma) has an output that does
            # not depend on its input, and an input the file cannot show: take PyTorch's there.
            got_in = torch.where(scale != 0, got_in / torch.where(scale != 0, scale, 1.0),
                                 torch_in)
        row.input_rel_err = _rel(got_in, torch_in, torch_in)[1]
        with torch.no_grad():
            own = layer(got_in)
        row.own_rel_err = _rel(got_out, own, torch_out)[1]
        row.passed = row.own_rel_err <= tol
        break
    return row
