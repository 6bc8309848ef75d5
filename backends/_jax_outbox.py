"""Captured values out of ``nnx.jit`` as ordinary outputs, through the model's own state.

``nnx.jit`` hands back every Variable a compiled call changed. While a trace block is open,
the NNX model holds one extra Variable, its outbox. A pass traced directly under ``nnx.jit``
stores its values in the outbox, so they leave the XLA computation as outputs, with no host
callback: JAX's callbacks copy every operand into new host memory, which costs the jitted
forward more (see benchmarks/README.md, JAX capture overhead).

When ``nnx.jit`` writes the changed outbox back into the model after a call, the outbox hands
the values to the recorder and takes its placeholder back. So the model's state, and with it
``nnx.jit``'s cache key, is the same before every call, and the function stays compiled.

A pass that cannot hand state back keeps the host callback: under plain ``jax.jit`` over
``nnx.merge``, inside ``nnx.grad`` or ``nnx.vmap``, or with the model closed over rather than
passed in.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import jax
import numpy as np

from ._jax_dims import is_tracer
from ._jax_runtime import Outbound

ATTRIBUTE = "layerscope_outbox"
_KEY_PREFIX = "layerscope-pass-"
#: the frames of ``nnx.jit`` that call the user's function while it is traced
_NNX_JIT_CALLS = {"JitFn.__call__", "SimpleJitFn.__call__", "SimpleJitPartialFn.__call__"}
_NNX_JIT_MODULE = "flax.nnx.transforms.compilation"

_pass_ids = itertools.count()
#: pass id -> where its values go; a compiled pass sends its id as the key of its values
_outbound: dict[int, Outbound] = {}


def _placeholder() -> np.ndarray:
    return np.zeros((), np.int8)


@functools.cache
def outbox_type() -> Any:
    from flax import nnx

    class Outbox(nnx.Variable):  # type: ignore[misc]
        """Delivers what ``nnx.jit`` writes back into it and keeps only its placeholder."""

        def set_raw_value(self, value: Any, **kwargs: Any) -> None:
            super().set_raw_value(_received(value), **kwargs)

        def update_from_state(self, variable_state: Any) -> None:
            super().update_from_state(variable_state)
            value = self.get_raw_value()
            if _is_delivery(value):
                self.set_raw_value(value)

    return Outbox


@contextmanager
def installed(model: Any) -> Iterator[None]:
    """Give ``model`` an outbox for the block; always taken away again. A model that takes no
    new attribute gets none, and its compiled passes use the host callback."""
    try:
        setattr(model, ATTRIBUTE, outbox_type()(_placeholder()))
        added = True
    except Exception:
        added = False
    try:
        yield
    finally:
        if added and hasattr(model, ATTRIBUTE):
            delattr(model, ATTRIBUTE)


def send(module: Any, outbound: Outbound, operands: list[Any]) -> bool:
    """Inside a traced call of ``module`` (the traced model or the copy ``nnx.jit`` made of
    it): put the pass's values in its outbox. False: they cannot leave that way."""
    box = getattr(module, ATTRIBUTE, None)
    # a hijax Variable crosses jit without the write-back the outbox hooks into
    if not isinstance(box, outbox_type()) or getattr(box, "hijax", False) \
            or not _can_update(box) or not _under_nnx_jit():
        return False
    pending = box.get_raw_value()
    payload = dict(pending) if isinstance(pending, dict) else {}  # the model called twice
    pass_id = next(_pass_ids)
    _outbound[pass_id] = outbound
    payload[f"{_KEY_PREFIX}{pass_id}"] = tuple(operands)
    box.set_raw_value(payload)
    return True


def _received(value: Any) -> Any:
    """Deliver the passes in ``value`` once they are real arrays; what the outbox keeps."""
    if not _is_delivery(value):
        return value
    for pass_id in sorted(int(key[len(_KEY_PREFIX):]) for key in value):
        outbound = _outbound.get(pass_id)
        if outbound is not None:
            outbound.deliver(value[f"{_KEY_PREFIX}{pass_id}"])
    return _placeholder()


def _is_delivery(value: Any) -> bool:
    """Passes written back after a compiled call (inside the trace they hold tracers)."""
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and k.startswith(_KEY_PREFIX) for k in value)
            and not any(is_tracer(leaf) for leaf in jax.tree.leaves(value)))


def _can_update(box: Any) -> bool:
    """Whether the outbox belongs to the trace running now (not closed over from outside)."""
    try:
        return bool(box._can_update)
    except Exception:  # a Flax without the check: do not risk a TraceContextError
        return False


def _under_nnx_jit() -> bool:
    """Whether the function being traced was called by ``nnx.jit``, which returns changed
    state, rather than by another transform: the first JAX or Flax frame above the user's
    code decides."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name.split(".")[0] in ("jax", "jaxlib", "flax"):
            return name == _NNX_JIT_MODULE and frame.f_code.co_qualname in _NNX_JIT_CALLS
        frame = frame.f_back
    return False
