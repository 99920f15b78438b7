"""A budget on what building a model may allocate, checked before each allocation.

Untrusted metadata (a converted checkpoint's ``model_kwargs``) can describe a model far larger
than the file that carries it (``stem_width=2**40``). :class:`AllocationBudget` is a
``TorchFunctionMode``: inside it every tensor factory call (``torch.empty``, ``zeros``, ``full``,
``arange``, ``Tensor.new_zeros``, ...) adds the number of elements it asks for to a running
total, and the call that would pass the limit raises instead of allocating. It counts on any
device, the ``meta`` device included, so one budget bounds a dry run and the real build alike.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["AllocationBudget", "requested_elements"]

#: Factories whose size is given as ints (``empty(2, 3)``) or one sequence (``empty((2, 3))``).
_SIZED = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full,
          torch.empty_strided, torch.randint, torch.normal, torch.Tensor.new_empty,
          torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
          torch.Tensor.new_empty_strided}
#: Factories shaped like an existing tensor.
_LIKE = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
         torch.randn_like, torch.randint_like}


def _as_size(value: Any) -> Optional[list[int]]:
    if isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def _size_of(args: tuple, kwargs: dict) -> Optional[list[int]]:
    if "size" in kwargs:
        return _as_size(kwargs["size"])
    for arg in args:  # (low, high, size), (size, fill), (self, size) ...
        size = _as_size(arg)
        if size is not None:
            return size
    ints = []
    for arg in args:  # empty(2, 3), self.new_zeros(2, 3)
        if isinstance(arg, torch.Tensor):
            continue
        if not isinstance(arg, int) or isinstance(arg, bool):
            break
        ints.append(arg)
    return ints or None


def _range_length(func: Any, args: tuple, kwargs: dict) -> int:
    if func in (torch.linspace, torch.logspace):
        steps = kwargs.get("steps", args[2] if len(args) > 2 else 0)
        return int(steps) if isinstance(steps, int) else 0
    nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(nums) == 1:  # arange(end)
        nums = [0, nums[0]]
    start, end, step = (nums + [0, 0, 1][len(nums):])[:3]  # arange(start, end[, step])
    start, end = kwargs.get("start", start), kwargs.get("end", end)
    step = kwargs.get("step", step)
    try:
        return max(0, math.ceil((end - start) / step))
    except (TypeError, ZeroDivisionError, OverflowError, ValueError):
        return 0


def requested_elements(func: Any, args: tuple, kwargs: dict) -> int:
    """How many elements the tensor factory call ``func(*args, **kwargs)`` would allocate (0 for
    anything else)."""
    if func in _SIZED:
        size = _size_of(args, kwargs)
        return math.prod(max(0, d) for d in size) if size else 0
    if func in _LIKE and args and isinstance(args[0], torch.Tensor):
        return args[0].numel()
    if func in (torch.arange, torch.linspace, torch.logspace):
        return _range_length(func, args, kwargs)
    if func is torch.eye:
        dims = [a for a in args if isinstance(a, int) and not isinstance(a, bool)][:2]
        return math.prod(dims) if len(dims) == 2 else (dims[0] ** 2 if dims else 0)
    return 0


class AllocationBudget(TorchFunctionMode):
    """``with AllocationBudget(limit, error):`` refuses the factory call that would take the
    elements requested so far past ``limit``, raising ``error(total)`` before it allocates."""

    def __init__(self, limit: int, error: Callable[[int], BaseException]) -> None:
        super().__init__()
        self.limit, self.error, self.total = int(limit), error, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = requested_elements(func, args, kwargs)
        if n:
            self.total += n
            if self.total > self.limit:
                raise self.error(self.total)
        return func(*args, **kwargs)
