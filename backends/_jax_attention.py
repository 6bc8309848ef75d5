"""Attention probabilities from JAX code: softmax taps and a recompute for fused attention.

Flax attention (``nnx.MultiHeadAttention``, ``linen.MultiHeadDotProductAttention`` and the
``dot_product_attention_weights`` helpers) normalises scores with ``jax.nn.softmax``; while a
capture is attached, that function (and its re-exports ``flax.nnx.softmax`` /
``flax.linen.softmax``) is wrapped so its result can be handed to the capture. NNX's default
attention takes the fused ``jax.nn.dot_product_attention`` path, which returns no weights;
while attached, JAX's XLA implementation of it is run step for step with its softmax
observed (same operations, same output), and for other implementations (cuDNN) the
probabilities are recomputed next to the call, ``softmax(q k^T * scale + bias, masked)``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._jax_dims import flax_classes, is_array
from ._patches import original, wrapped

_NOT_ATTENTION = ("Output", "Mask", "Bias", "Rotary", "Embedding", "Embed", "Norm", "Pool")
_SOFTMAX_HOMES = ("jax.nn", "flax.nnx", "flax.linen", "flax.nnx.nn.activations",
                  "flax.linen.activation")

#: Receives attention probabilities (batch..., head, query, key) and returns what the
#: traced code should go on with (the same array, possibly marked).
ProbabilitySink = Callable[[Any], Any]

#: Held while JAX's attention core runs with its softmax observed (a module attribute swapped
#: for the call, traced on one thread at a time)
_CORE_SOFTMAX = threading.RLock()


def is_attention_name(name: str) -> bool:
    """A module class named like an attention layer (not its output projection or mask)."""
    return "Attention" in name and not any(part in name for part in _NOT_ATTENTION)


def is_attention_scope(name: str) -> bool:
    """A ``jax.named_scope`` that holds attention: its last part ends with ``attention``."""
    return name.lower().endswith("attention")


def current_scopes() -> tuple[str, ...]:
    """The ``jax.named_scope`` names active where the caller runs (innermost last)."""
    try:
        from jax._src import source_info_util
    except ImportError:  # a JAX without this module: the scope rule is simply not applied
        return ()
    stack = source_info_util.current_name_stack().stack
    return tuple(str(entry.name) for entry in stack if type(entry).__name__ == "Scope")


def recompute_probabilities(softmax: Callable[..., Any], query: Any, key: Any,
                            bias: Any = None, mask: Any = None, scale: float | None = None,
                            is_causal: bool = False) -> Any:
    """The probabilities ``jax.nn.dot_product_attention`` forms internally, (…, N, T, S).

    ``query`` is (…, T, N, H), ``key`` (…, S, K, H) with N a multiple of K (grouped heads).
    """
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if kv_heads != heads:
        key = jnp.repeat(key, heads // kv_heads, axis=-2)
    logits_dtype = jnp.promote_types(query.dtype, np.float32)
    logits = jnp.einsum("...tnh,...snh->...nts", query, key,
                        preferred_element_type=logits_dtype)
    if scale is None:
        scale = 1.0 / float(np.sqrt(query.shape[-1]))
    logits = logits * jnp.array(scale, dtype=logits.dtype)
    if bias is not None:
        logits = (logits + bias).astype(logits.dtype)
    large_negative = jnp.asarray(-0.7 * float(jnp.finfo(logits.dtype).max), logits.dtype)
    if mask is not None:
        logits = jnp.where(jnp.asarray(mask, dtype=bool), logits, large_negative)
    if is_causal:
        length, source = logits.shape[-2], logits.shape[-1]
        causal = jnp.tril(jnp.ones((length, source), dtype=bool))
        logits = jnp.where(causal, logits, large_negative)
    return softmax(logits.astype(np.float32)).astype(query.dtype)


class AttentionTaps:
    """Wraps the softmax functions and fused attention for the duration of a block."""

    def __init__(self, sink: ProbabilitySink, active: Callable[[], bool]) -> None:
        #: called with every probability array formed while ``active()`` is true
        self.sink = sink
        self.active = active
        self._inside = False  # our own recompute calls softmax: do not report it twice
        self._fused_call = False  # inside jax.nn.dot_product_attention
        self._taken: Any = None

    def _softmax(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def softmax(x: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(x, *args, **kwargs)
            if self._inside or not self.active():
                return out
            return self.sink(out)

        softmax.__wrapped__ = original  # type: ignore[attr-defined]
        return softmax

    def _fused(self, original: Callable[..., Any], softmax: Callable[..., Any]
               ) -> Callable[..., Any]:
        def dot_product_attention(query: Any, key: Any, value: Any, bias: Any = None,
                                  mask: Any = None, **kwargs: Any) -> Any:
            if self._inside or not self.active():
                return original(query, key, value, bias, mask, **kwargs)
            self._taken, self._fused_call = None, True
            try:
                out = original(query, key, value, bias, mask, **kwargs)
            finally:
                self._fused_call = False
            if self._taken is not None:  # the XLA implementation handed its own softmax out
                taken, self._taken = self._taken, None
                self.sink(taken)
                return out
            self._inside = True  # another implementation (cuDNN): recompute next to it
            try:
                probs = recompute_probabilities(
                    softmax, query, key, bias, mask, kwargs.get("scale"),
                    bool(kwargs.get("is_causal", False)))
            finally:
                self._inside = False
            self.sink(probs)
            return out

        dot_product_attention.__wrapped__ = original  # type: ignore[attr-defined]
        return dot_product_attention

    def _xla(self, functions: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        """JAX's XLA attention, step for step, also returning the softmax it computes.

        The same grouping, vmap and core function as ``_dot_product_attention_xla``; only the
        core's ``softmax`` is observed, so the output is computed by the same operations and
        the probabilities are the ones the output was made from.
        """
        core = functions._dot_product_attention_core

        def with_probabilities(*args: Any) -> tuple[Any, Any]:
            taken: list[Any] = []
            with _CORE_SOFTMAX:  # swapped for this thread's call only
                softmax = functions.softmax

                def observed(x: Any, *a: Any, **k: Any) -> Any:
                    taken.append(softmax(x, *a, **k))
                    return taken[-1]

                functions.softmax = observed
                try:
                    encoded = core(*args)
                finally:
                    functions.softmax = softmax
            return encoded, taken[-1]

        def xla(query: Any, key: Any, value: Any, bias: Any, mask: Any, is_causal: Any,
                scale: Any, q_seqlen: Any, kv_seqlen: Any, local_window_size: Any,
                return_residual: bool = False) -> Any:
            args = (query, key, value, bias, mask, is_causal, scale, q_seqlen, kv_seqlen,
                    local_window_size)
            if not self._fused_call or return_residual:
                return original(*args, return_residual)
            batch, length, heads, depth = query.shape
            source, kv_heads = key.shape[1], key.shape[2]
            groups = heads // kv_heads

            def grouped(t: Any) -> Any:
                if t is None:
                    return t
                t_batch, t_heads, t_length, t_source = t.shape
                if t_heads == 1:
                    return jnp.broadcast_to(t[:, :, None, :, :],
                                            (t_batch, t_heads, groups, t_length, t_source))
                return jnp.reshape(t, (t_batch, kv_heads, groups, t_length, t_source))

            encoded, probs = jax.vmap(
                with_probabilities, in_axes=(3, None, None, 2, 2) + (None,) * 6,
                out_axes=(3, 2),
            )(jnp.reshape(query, (batch, length, kv_heads, groups, depth)), key, value,
              grouped(bias), grouped(mask), is_causal, scale, q_seqlen, kv_seqlen,
              local_window_size, False)
            self._taken = jnp.reshape(probs, (batch, heads, length, source)).astype(key.dtype)
            return jnp.reshape(encoded, (batch, length, heads, depth))

        return xla

    @contextmanager
    def patched(self) -> Iterator[None]:
        """Install the wrappers; every patched attribute is put back, whatever happens, also
        when traces on other threads end in another order."""
        true_softmax = original(jax.nn, "softmax")
        with ExitStack() as stack:
            for home in _SOFTMAX_HOMES:
                module: Any = sys.modules.get(home)
                if module is not None and original(module, "softmax") is true_softmax:
                    stack.enter_context(wrapped(module, "softmax", self._softmax))
            stack.enter_context(wrapped(
                jax.nn, "dot_product_attention",
                lambda fused: self._fused(fused, true_softmax)))
            functions = _xla_attention_module()
            if functions is not None:
                stack.enter_context(wrapped(
                    functions, "_dot_product_attention_xla",
                    lambda xla: self._xla(functions, xla)))
            yield


def _xla_attention_module() -> Any:
    """JAX's module holding the XLA attention implementation, when it has the expected
    parts; otherwise fused attention falls back to recomputing the probabilities."""
    try:
        from jax._src.nn import functions
    except ImportError:
        return None
    needed = ("_dot_product_attention_xla", "_dot_product_attention_core", "softmax")
    return functions if all(hasattr(functions, name) for name in needed) else None


#: Flax attention classes whose call is ``(inputs_q, inputs_k=None, inputs_v=None, ...)``
_QKV_CLASSES = ("MultiHeadAttention", "MultiHeadDotProductAttention")


def attention_kind(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int,
                   probs_shape: tuple[int, ...]) -> str | None:
    """``self`` when an attention module's queries and keys come from the same array,
    ``cross`` when they come from another one, None when that cannot be told for certain.

    Flax's own attention classes say it by their arguments (no ``inputs_k``, or the same array
    as ``inputs_q``, is self-attention, whatever the cache does). Another module is
    self-attention when it receives one (batch, token, feature) float array, and
    cross-attention when it receives two whose second has as many positions as the map has
    keys and the first another number; anything else (a bias or a rotary table beside the
    sequence, equal lengths) stays unsaid.
    """
    if isinstance(module, flax_classes(*_QKV_CLASSES)):
        if type(module).__name__ == "SelfAttention":
            return "self"
        query = args[0] if args else kwargs.get("inputs_q")
        keys = args[1] if len(args) > 1 else kwargs.get("inputs_k", kwargs.get("inputs_kv"))
        return "self" if keys is None or keys is query else "cross"
    sequences: list[Any] = []
    for value in (*args, *kwargs.values()):
        if is_array(value) and value.ndim == 3 and int(value.shape[0]) == batch and \
                jnp.issubdtype(value.dtype, jnp.floating) and \
                not any(value is seen for seen in sequences):
            sequences.append(value)
    if len(sequences) == 1:
        return "self"
    if len(sequences) == 2 and len(probs_shape) >= 2 and \
            int(sequences[1].shape[1]) == probs_shape[-1] != int(sequences[0].shape[1]):
        return "cross"
    return None
