"""Arrays, dimension roles and batch discovery for the JAX backend.

Flax lays images out channels-last (NHWC), so a 4-d activation of a convolution is
(batch, height, width, channel); sequences are (batch, token, feature) unless a recurrent
layer runs time-major. Attention probabilities from Flax are (batch, head, query, key).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from layerscope.core.naming import default_roles, feature_role

from ._structure import leaves

#: Module class names (prefixes) whose 3- to 5-d outputs are channels-last images.
_IMAGE_MODULES = (
    "Conv", "ConvTranspose", "ConvLocal", "BatchNorm", "GroupNorm", "InstanceNorm", "Pool",
    "MaxPool", "AvgPool", "Upsample", "Dropout2d",
)
_SPATIAL = {3: ("width",), 4: ("height", "width"), 5: ("depth", "height", "width")}
_RECURRENT = ("RNN", "Bidirectional", "GRU", "LSTM")
#: Modules whose 4-d outputs are (batch, token, head, feature) projections, not images.
_NOT_IMAGE = ("Linear", "Dense", "Einsum", "Embed")


def is_array(value: Any) -> bool:
    """A JAX array, a tracer standing for one, or a NumPy array."""
    return isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer))


def is_tracer(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def to_numpy(value: Any) -> np.ndarray:
    """A host copy with the dtype kept; bfloat16 and other ML float types widen to float32,
    which holds each of their values exactly."""
    array = np.asarray(value)
    if array.dtype.kind == "V" or array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return array.astype(np.float32)
    return array


def arrays(value: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, array) for every array in a nested output (tuples, lists, dicts, dataclasses)."""
    return leaves(value, is_array)


def batch_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[int | None, Any]:
    """Batch size and token ids of a root call.

    The batch comes from ``input_ids`` when given, else from the first positional argument
    that is itself an array (so ``apply(variables, x)`` and ``f(params, x)`` find ``x``, not
    a parameter), else from the first array anywhere in the arguments. A 2-d integer array
    found that way is taken as token ids.
    """
    token_ids = kwargs.get("input_ids")
    first = next((a for a in args if is_array(a) and a.ndim >= 1), None)
    if first is None:
        first = next((a for _, a in arrays((args, dict(kwargs))) if a.ndim >= 1), None)
    if token_ids is None and first is not None and first.ndim == 2 and \
            np.issubdtype(first.dtype, np.integer):
        token_ids = first
    if token_ids is not None and is_array(token_ids) and token_ids.ndim >= 1:
        return int(token_ids.shape[0]), token_ids
    return (int(first.shape[0]) if first is not None else None), None


def roles_for(module: Any, kind: str, shape: tuple[int, ...],
              hidden_size: int | None) -> tuple[str, ...]:
    """Role names for each axis of an array of ``shape`` taken as ``kind`` at ``module``
    (a Flax module, or None for a named scope of a plain function)."""
    ndim = len(shape)
    if ndim == 0:
        return ()
    if kind.startswith("attention"):
        return ("batch", "head", "query", "key")[-ndim:] if ndim >= 3 else default_roles(ndim)
    name = type(module).__name__ if module is not None else ""
    if ndim == 3 and kind.startswith("output") and name.startswith(_RECURRENT):
        if getattr(module, "time_major", False):
            return ("token", "batch", "hidden")
        return ("batch", "token", "hidden")
    if ndim in _SPATIAL and name.startswith(_IMAGE_MODULES):
        return ("batch", *_SPATIAL[ndim], "channel")
    if ndim == 4 and module is not None and not name.startswith(_NOT_IMAGE) \
            and "Attention" not in name:
        return ("batch", "height", "width", "channel")  # a block of a channels-last CNN
    if ndim == 4 and name.startswith(_NOT_IMAGE):
        return ("batch", "token", "head", "axis3")  # per-head projections (LinearGeneral)
    if ndim == 1:
        return ("batch",)
    if ndim == 2:
        return ("batch", feature_role(shape[-1], hidden_size))
    if ndim == 3:
        return ("batch", "token", feature_role(shape[-1], hidden_size))
    return default_roles(ndim)
