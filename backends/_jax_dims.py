"""Arrays, dimension roles and batch discovery for the JAX backend.

Flax lays images out channels-last (NHWC), so a map of a convolution is
(batch, height, width, channel), stored in that order with those names so it lines up by
name with a channels-first map. Roles come from what a module is, never from rank alone:

- ``channel`` and the spatial axes for Flax's convolutions at their rank, for Flax's batch,
  group and instance norms at rank 4 and 5, for a map passed on unchanged or through a norm,
  dropout or pointwise linear layer (also with an activation between), and for the 4-d or
  5-d output of another module whose last axis has the channel count of the map last made
  inside it (or, failing that, beside it in the enclosing module): a CNN block, a pooling or
  activation module;
- per-head projections (``LinearGeneral`` with two output features inside an attention
  module) are (batch, token, head, axis3);
- 2-d and 3-d arrays are (batch, feature) and (batch, token, feature);
- anything else gets neutral names (``batch``, ``axis1``, ...). Sequences are batch first
  unless a recurrent layer runs time-major. Attention probabilities from Flax are
  (batch, head, query, key).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from layerscope.core.naming import default_roles, feature_role

from ._structure import leaves

_SPATIAL = {3: ("width",), 4: ("height", "width"), 5: ("depth", "height", "width")}
_RECURRENT = ("RNN", "Bidirectional", "GRU", "LSTM")
#: Flax classes (``flax.nnx`` and ``flax.linen`` names) by what they do to a layout
_CONVOLUTIONS = ("Conv", "ConvTranspose", "ConvLocal")
_IMAGE_NORMS = ("BatchNorm", "GroupNorm", "InstanceNorm")  # channels-last at rank 4 and 5
_SAME_LAYOUT = (*_IMAGE_NORMS, "LayerNorm", "RMSNorm", "Dropout")
_LINEAR = ("Linear", "Dense")
_GENERAL = ("LinearGeneral", "DenseGeneral")
_OTHER_FLAX = ("Einsum", "Embed", "LoRA", "LoRALinear")
_FLAX_HOMES = ("flax.nnx", "flax.linen")


_classes: dict[tuple[str, ...], tuple[type, ...]] = {}


def flax_classes(*names: str) -> tuple[type, ...]:
    """The Flax NNX and Linen classes of these names that are loaded (nothing is imported)."""
    cached = _classes.get(names)
    if cached is not None:
        return cached
    found = []
    for home in _FLAX_HOMES:
        module = sys.modules.get(home)
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type):
                found.append(cls)
    if all(home in sys.modules for home in _FLAX_HOMES):  # later imports add nothing
        _classes[names] = tuple(found)
    return tuple(found)


@dataclass(frozen=True)
class Context:
    """What is known around an array besides its module and shape."""

    #: the roles this very array was given earlier in the pass (returned unchanged)
    inherited: tuple[str, ...] | None = None
    #: the roles of the module's first array argument, where known, and its shape
    input_roles: tuple[str, ...] | None = None
    input_shape: tuple[int, ...] | None = None
    #: (rank, channels) of the channels-last map last made inside the module, else beside it
    image: tuple[int, int] | None = None
    #: the module is called by an attention module
    in_attention: bool = False


def image_roles(ndim: int) -> tuple[str, ...]:
    return ("batch", *_SPATIAL[ndim], "channel")


def image_layout(roles: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rank, channels) when ``roles`` are a channels-last map's, else None."""
    if len(shape) in _SPATIAL and roles == image_roles(len(shape)):
        return len(shape), int(shape[-1])
    return None


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


def roles_for(module: Any, kind: str, shape: tuple[int, ...], hidden_size: int | None,
              context: Context | None = None) -> tuple[str, ...]:
    """Role names for each axis of an array of ``shape`` taken as ``kind`` at ``module``
    (a Flax module, or None for a named scope of a plain function)."""
    ndim = len(shape)
    if ndim == 0:
        return ()
    if kind.startswith("attention"):
        if ndim == 3:  # a single head: the first axis is still the batch
            return ("batch", "query", "key")
        return ("batch", "head", "query", "key") if ndim == 4 else default_roles(ndim)
    context = context or Context()
    if context.inherited is not None and len(context.inherited) == ndim:
        return context.inherited
    name = type(module).__name__ if module is not None else ""
    if ndim == 3 and kind.startswith("output") and name.startswith(_RECURRENT):
        if getattr(module, "time_major", False):
            return ("token", "batch", "hidden")
        return ("batch", "token", "hidden")
    if module is not None:
        known = _module_roles(module, kind, shape, hidden_size, context)
        if known is not None:
            return known
    if ndim == 1:
        return ("batch",)
    if ndim == 2:
        return ("batch", feature_role(shape[-1], hidden_size))
    if ndim == 3:
        return ("batch", "token", feature_role(shape[-1], hidden_size))
    return default_roles(ndim)


def _module_roles(module: Any, kind: str, shape: tuple[int, ...], hidden_size: int | None,
                  context: Context) -> tuple[str, ...] | None:
    """Roles that follow from what ``module`` is; None: the plain rank rules apply."""
    ndim = len(shape)
    if isinstance(module, flax_classes(*_CONVOLUTIONS)):
        kernel = getattr(module, "kernel_size", None)
        spatial = 1 if isinstance(kernel, int) else len(kernel) if kernel is not None else None
        if ndim in _SPATIAL and (spatial is None or ndim == spatial + 2):
            return image_roles(ndim)
        return default_roles(ndim)  # an unbatched or otherwise unusual call
    if not kind.startswith("output"):
        return None
    input_roles = context.input_roles
    fits_input = input_roles is not None and len(input_roles) == ndim
    if isinstance(module, flax_classes(*_SAME_LAYOUT)):
        if fits_input:
            return input_roles
        if ndim in (4, 5) and (isinstance(module, flax_classes(*_IMAGE_NORMS))
                               or context.image == (ndim, shape[-1])):
            return image_roles(ndim)
        return default_roles(ndim) if ndim >= 4 else None
    if isinstance(module, flax_classes(*_LINEAR)):
        if fits_input and input_roles is not None and input_roles[-1] == "channel":
            return input_roles  # pointwise over a map's channels: a 1x1 convolution
        shape_in = context.input_shape
        if ndim in (4, 5) and shape_in is not None and \
                context.image == (len(shape_in), shape_in[-1]):
            return image_roles(ndim)  # the same, over an activation of that map
        if ndim >= 4:
            return (*default_roles(ndim)[:-1], feature_role(shape[-1], hidden_size))
        return None
    if isinstance(module, flax_classes(*_GENERAL)):
        out = getattr(module, "out_features", getattr(module, "features", None))  # NNX, Linen
        if ndim == 4 and context.in_attention and context.input_shape is not None and \
                len(context.input_shape) == 3 and \
                isinstance(out, (tuple, list)) and len(out) == 2:
            return ("batch", "token", "head", "axis3")  # query / key / value per head
        return default_roles(ndim) if ndim >= 4 else None
    if isinstance(module, flax_classes(*_OTHER_FLAX)):
        return default_roles(ndim) if ndim >= 4 else None
    if ndim in (4, 5) and context.image == (ndim, shape[-1]):
        return image_roles(ndim)  # a CNN block, a pooling or activation module
    return default_roles(ndim) if ndim >= 4 else None
