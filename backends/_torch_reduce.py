"""The array operations reductions need (``layerscope.core.reduce.ArrayOps``), in PyTorch, on
the tensor's own device: only their results are copied to the host."""

from __future__ import annotations

from typing import Any

import torch

from layerscope.core.reduce import ArrayOps

_HALF = (torch.float16, torch.bfloat16)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Float32 at least: means and norms of half floats (and of integers) in float32."""
    return x.float() if x.dtype in _HALF or not x.is_floating_point() else x


def _along(mask: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A (batch or 1, length) mask shaped to broadcast against ``x`` along ``axis``."""
    shape = [1] * x.dim()
    shape[0], shape[axis] = -1, mask.shape[-1]
    return mask.to(x.device).reshape(shape)


class TorchOps:
    def spans(self, mask: Any) -> tuple[Any, Any]:
        real = mask != 0
        count = real.sum(dim=1, keepdim=True)
        first = real.to(torch.int8).argmax(dim=1, keepdim=True)  # the first real position
        return first, count

    def arange(self, n: int, like: Any) -> Any:
        return torch.arange(n, device=like.device, dtype=torch.int64)

    def take(self, x: Any, axis: int, index: Any) -> Any:
        index = index.to(x.device).clamp(0, x.shape[axis] - 1)
        return torch.take_along_dim(x, _along(index, x, axis), dim=axis)

    def fill(self, x: Any, axis: int, keep: Any) -> Any:
        value: float | bool
        if x.is_floating_point() or x.is_complex():
            value = float("nan")
        else:
            value = False if x.dtype is torch.bool else 0 if x.dtype is torch.uint8 else -1
        # a Python scalar, not a tensor made of one: that is a copy from the host, which on a
        # GPU waits for the device (a scalar of the tensor's kind keeps its dtype)
        return torch.where(_along(keep != 0, x, axis), x, value)

    def mean(self, x: Any, axis: int, keep: Any) -> Any:
        x = _wide(x)
        if keep is None:
            return x.mean(dim=axis)
        weights = _along(keep != 0, x, axis)
        total = torch.where(weights, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return total.sum(dim=axis) / weights.sum(dim=axis).to(x.dtype)

    def norm(self, x: Any, axis: int) -> Any:
        x = _wide(x)
        return (x * x).sum(dim=axis).sqrt()

    def topk(self, x: Any, axis: int, k: int) -> tuple[Any, Any]:
        values, index = torch.topk(x, k, dim=axis, largest=True, sorted=True)
        return values, index


OPS: ArrayOps = TorchOps()
