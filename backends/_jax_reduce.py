"""The array operations reductions need (``layerscope.core.reduce.ArrayOps``) in ``jax.numpy``:
eagerly on the array's device, and under ``jax.jit`` as part of the compiled computation, so
only the results leave it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from layerscope.core import Recorder
from layerscope.core.reduce import ArrayOps, PassMasks

from ._jax_runtime import Item

_INDEX = jnp.int32


def _wide(x: Any) -> Any:
    """Float32 at least: means and norms of half floats (and of integers) in float32."""
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


def _along(mask: Any, x: Any, axis: int) -> Any:
    """A (batch or 1, length) mask shaped to broadcast against ``x`` along ``axis``."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = -1, mask.shape[-1]
    return jnp.reshape(mask, shape)


class JaxOps:
    def spans(self, mask: Any) -> tuple[Any, Any]:
        real = jnp.asarray(mask) != 0
        count = real.sum(axis=1, keepdims=True, dtype=_INDEX)
        first = jnp.argmax(real, axis=1, keepdims=True).astype(_INDEX)
        return first, count

    def arange(self, n: int, like: Any) -> Any:
        return jnp.arange(n, dtype=_INDEX)

    def take(self, x: Any, axis: int, index: Any) -> Any:
        index = jnp.clip(index, 0, x.shape[axis] - 1)
        return jnp.take_along_axis(x, _along(index, x, axis), axis=axis)

    def fill(self, x: Any, axis: int, keep: Any) -> Any:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            value: float = float("nan")
        else:
            value = 0 if x.dtype in (jnp.bool_, jnp.uint8) else -1
        return jnp.where(_along(jnp.asarray(keep) != 0, x, axis), x,
                         jnp.asarray(value, dtype=x.dtype))

    def mean(self, x: Any, axis: int, keep: Any) -> Any:
        x = _wide(x)
        if keep is None:
            return x.mean(axis=axis)
        weights = _along(jnp.asarray(keep) != 0, x, axis)
        total = jnp.where(weights, x, jnp.zeros((), x.dtype)).sum(axis=axis)
        return total / weights.sum(axis=axis, dtype=x.dtype)

    def norm(self, x: Any, axis: int) -> Any:
        x = _wide(x)
        return jnp.sqrt((x * x).sum(axis=axis))

    def topk(self, x: Any, axis: int, k: int) -> tuple[Any, Any]:
        values, index = jax.lax.top_k(jnp.moveaxis(x, axis, -1), k)
        return jnp.moveaxis(values, -1, axis), jnp.moveaxis(index, -1, axis)


OPS: ArrayOps = JaxOps()


#: keyword arguments of a root call that hold which token positions are real
MASK_ARGUMENTS = ("attention_mask", "padding_mask", "mask")


def pass_masks(batch: int, token_ids: Any, kwargs: Mapping[str, Any]) -> PassMasks:
    """The real-token mask of a root call: its ``attention_mask`` / ``padding_mask`` / ``mask``
    keyword argument, when it has the token ids' shape."""
    shape = tuple(getattr(token_ids, "shape", ()))
    found = next((kwargs[k] for k in MASK_ARGUMENTS if isinstance(kwargs.get(k), jax.Array)
                  and tuple(kwargs[k].shape) == shape and len(shape) == 2), None)
    return PassMasks(batch, found)


def reduced(recorder: Recorder, items: list[Item], masks: PassMasks) -> list[Item]:
    """``items``, each replaced by the reductions of it the selection asks for (computed in
    ``jax.numpy``: under a trace, as part of the compiled computation)."""
    if not recorder.selection.reduces:
        return items
    out = []
    for item in items:
        for piece in recorder.reduce(item.site, item.kind, item.value, item.roles, OPS, masks):
            attrs = {**(item.attrs or {}), **piece.attrs} or None
            out.append(Item(item.site, piece.kind, piece.value, piece.roles, item.module_type,
                            attrs))
    return out
