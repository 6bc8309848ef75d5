"""The array operations reductions need (``layerscope.core.reduce.ArrayOps``) in ``keras.ops``,
so one set serves Keras on TensorFlow (eager, and inside a ``tf.function`` graph, where they
become part of the graph), JAX and PyTorch, on the tensor's own device."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from layerscope.core.reduce import ArrayOps

_INDEX = "int32"


def _dtype(x: Any) -> str:
    return str(keras.backend.standardize_dtype(x.dtype))


def _wide(x: Any) -> Any:
    """Float32 at least: means and norms of half floats (and of integers) in float32."""
    dtype = _dtype(x)
    return x if dtype in ("float32", "float64") else ops.cast(x, "float32")


def _along(mask: Any, x: Any, axis: int) -> Any:
    """A (batch or 1, length) mask shaped to broadcast against ``x`` along ``axis``."""
    rank = len(x.shape)
    for _ in range(axis + 1, rank):
        mask = ops.expand_dims(mask, -1)
    for _ in range(1, axis):
        mask = ops.expand_dims(mask, 1)
    return mask


class KerasOps:
    def spans(self, mask: Any) -> tuple[Any, Any]:
        real = ops.cast(ops.not_equal(mask, 0), _INDEX)
        count = ops.sum(real, axis=1, keepdims=True)
        first = ops.expand_dims(ops.cast(ops.argmax(real, axis=1), _INDEX), 1)
        return first, count

    def arange(self, n: int, like: Any) -> Any:
        return ops.arange(n, dtype=_INDEX)

    def take(self, x: Any, axis: int, index: Any) -> Any:
        index = ops.reshape(index, (-1, index.shape[-1]))
        index = ops.clip(index, 0, ops.shape(x)[axis] - 1)
        return ops.take_along_axis(x, _along(index, x, axis), axis=axis)

    def fill(self, x: Any, axis: int, keep: Any) -> Any:
        dtype = _dtype(x)
        value = float("nan") if "float" in dtype else 0 if dtype in ("bool", "uint8") else -1
        keep = ops.reshape(ops.not_equal(keep, 0), (-1, keep.shape[-1]))
        return ops.where(_along(keep, x, axis), x, ops.cast(value, dtype))

    def mean(self, x: Any, axis: int, keep: Any) -> Any:
        x = _wide(x)
        if keep is None:
            return ops.mean(x, axis=axis)
        weights = _along(ops.reshape(ops.not_equal(keep, 0), (-1, keep.shape[-1])), x, axis)
        total = ops.sum(ops.where(weights, x, ops.zeros((), x.dtype)), axis=axis)
        return total / ops.sum(ops.cast(weights, x.dtype), axis=axis)

    def norm(self, x: Any, axis: int) -> Any:
        x = _wide(x)
        return ops.sqrt(ops.sum(x * x, axis=axis))

    def topk(self, x: Any, axis: int, k: int) -> tuple[Any, Any]:
        last = len(x.shape) - 1
        values, index = ops.top_k(ops.moveaxis(x, axis, last), k, sorted=True)
        return ops.moveaxis(values, last, axis), ops.moveaxis(index, last, axis)


OPS: ArrayOps = KerasOps()
