"""The reductions' array operations in NumPy, on the host: what the recorder falls back on for
a backend that hands over whole tensors without calling :meth:`Recorder.reduce` (a plugin
written before reductions existed), so every backend stores what the selection asks for."""

from __future__ import annotations

from typing import Any

import numpy as np

from .growth import fill_value_for
from .reduce import ArrayOps


def _wide(x: np.ndarray) -> np.ndarray:
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _along(mask: Any, x: np.ndarray, axis: int) -> np.ndarray:
    mask = np.asarray(mask)
    shape = [1] * x.ndim
    shape[0], shape[axis] = -1, mask.shape[-1]
    return mask.reshape(shape)


class NumpyOps:
    def spans(self, mask: Any) -> tuple[Any, Any]:
        real = np.asarray(mask) != 0
        return (real.argmax(axis=1)[:, None].astype(np.int64),
                real.sum(axis=1, keepdims=True, dtype=np.int64))

    def arange(self, n: int, like: Any) -> Any:
        return np.arange(n, dtype=np.int64)

    def take(self, x: Any, axis: int, index: Any) -> Any:
        index = np.clip(np.asarray(index), 0, x.shape[axis] - 1)
        index = np.broadcast_to(_along(index, x, axis),
                                x.shape[:axis] + (index.shape[-1],) + x.shape[axis + 1:])
        return np.take_along_axis(x, index, axis=axis)

    def fill(self, x: Any, axis: int, keep: Any) -> Any:
        return np.where(_along(np.asarray(keep) != 0, x, axis), x,
                        np.asarray(fill_value_for(x.dtype), dtype=x.dtype))

    def mean(self, x: Any, axis: int, keep: Any) -> Any:
        x = _wide(np.asarray(x))
        if keep is None:
            return x.mean(axis=axis)
        weights = _along(np.asarray(keep) != 0, x, axis)
        total = np.where(weights, x, np.zeros((), x.dtype)).sum(axis=axis)
        return total / weights.sum(axis=axis, dtype=x.dtype)

    def norm(self, x: Any, axis: int) -> Any:
        x = _wide(np.asarray(x))
        return np.sqrt((x * x).sum(axis=axis))

    def topk(self, x: Any, axis: int, k: int) -> tuple[Any, Any]:
        index = np.take(np.argsort(-x, axis=axis, kind="stable"), np.arange(k), axis=axis)
        return np.take_along_axis(x, index, axis=axis), index


OPS: ArrayOps = NumpyOps()
