"""Devices and DistributedDataParallel: which device, which rank, how statistics agree.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialized here:
``nccl`` on CUDA, ``gloo`` on CPU. Running statistics are made to agree across ranks by averaging
every BatchNorm/SBN running buffer with an all-reduce before each evaluation and save (what timm's
``distribute_bn(reduce=True)`` does); DDP's own ``broadcast_buffers`` is off, since it would
overwrite every rank's statistics with rank 0's and discard the other ranks' batches.
``--sync-stats`` computes the batch statistics over the global batch instead: BatchNorm layers
become ``SyncBatchNorm`` (torch's, CUDA only) and SBN layers synchronize theirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DeviceError
from ..layers import SpectralBatchNorm2d, sync_sbn_stats

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(request: Optional[str], local_rank: int = 0) -> torch.device:
    """``None``/``auto``: CUDA when present, else CPU. ``cuda`` without CUDA is a DeviceError."""
    req = (request or "auto").lower()
    if req == "auto":
        req = "cuda" if torch.cuda.is_available() else "cpu"
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {request} asked for CUDA, but this machine has no CUDA device (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); use "
                f"--device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if req == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(req)
    if req == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown --device {request!r}; use auto, cpu or cuda")


def rank_local_buffers() -> dict[str, bool]:
    """DistributedDataParallel's keyword that leaves each rank its own running statistics in
    the forward pass (they are agreed before each evaluation and save: ``average_running_stats``):
    ``forward_sync_buffers=False`` where this torch has it, since ``broadcast_buffers`` is
    deprecated there and warns on every rank; else ``broadcast_buffers=False``. The newer one
    also copies rank 0's buffers once when DDP wraps the model, where every rank holds the same
    model (a resumed rank's own statistics are loaded after that)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def setup(device_request: Optional[str]) -> DistContext:
    """Resolve the device and, under torchrun, join (or create) the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                       device=device, created_group=created)


def to_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm (and timm's BatchNormAct2d) to their synchronized forms, keeping the hooks that
    apply SBN after or before them (torch's conversion would drop them), then SBN layers
    synchronize their statistics through ``sbn_surgery.layers.sync_sbn_stats``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
    if has_bn and device.type != "cuda":
        raise DeviceError(
            "--sync-stats turns BatchNorm into torch's SyncBatchNorm, which runs on CUDA only; on "
            "CPU train without --sync-stats (running statistics are still averaged across ranks "
            "after every epoch)"
        )
    hooks = {name: {d: dict(getattr(m, d)) for d in _HOOK_DICTS if hasattr(m, d)}
             for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    from timm.layers import convert_sync_batchnorm

    model = convert_sync_batchnorm(model)
    for name, saved in hooks.items():
        new = model.get_submodule(name) if name else model
        for attr, entries in saved.items():
            getattr(new, attr).update(entries)
    sync_sbn_stats(model)
    return model


def running_buffers(model: nn.Module) -> list[torch.Tensor]:
    from torch.nn.modules.batchnorm import _NormBase

    out = []
    for m in model.modules():
        if isinstance(m, (_NormBase, SpectralBatchNorm2d)):
            for name in ("running_mean", "running_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    out.append(t)
    return out


def average_running_stats(model: nn.Module, ctx: DistContext) -> None:
    """All-reduce mean of every BatchNorm/SBN running buffer, so all ranks hold the same."""
    if not ctx.distributed:
        return
    bufs = running_buffers(model)
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world
    offset = 0
    with torch.no_grad():
        for b in bufs:
            n = b.numel()
            b.copy_(flat[offset:offset + n].view_as(b).to(b.dtype))
            offset += n


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same batch)."""
    if not ctx.distributed:
        return flag
    return all_reduce_sum([1.0 if flag else 0.0], ctx)[0] > 0


def gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
