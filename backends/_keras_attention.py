"""Attention probabilities from Keras attention layers, on every backend Keras runs on.

Two layer families:

- ``keras.layers.MultiHeadAttention`` and the keras-hub layers built on it (the BERT
  ``TransformerEncoder``, the GPT-2 ``TransformerDecoder``). Its ``_compute_attention`` returns
  the softmax scores only on its explicit path; with no dropout and no scores asked for it
  calls the fused ``ops.dot_product_attention``, which returns none. The tap lets the call run
  unchanged (so the model's outputs are untouched) and, when no scores came back, recomputes
  them with the operations the explicit path uses.
- keras-hub's own attention layers (Llama, Mistral, Qwen, Phi-3, ...): not
  ``MultiHeadAttention`` subclasses, but each has ``_compute_attention`` and
  ``_masked_softmax``. The tap takes what ``_masked_softmax`` returns inside
  ``_compute_attention``. On JAX and PyTorch these layers take a fused kernel instead
  (``ops.dot_product_attention``), which never calls it: the probabilities are then
  recomputed from the layer's own query, key and mask, as its explicit path does, for the
  layers whose explicit path is the plain scaled dot product (``_dot_product_equation`` and
  ``_inv_norm_factor``); any other layer gets a warning that its map is not available.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

#: ``_compute_attention`` parameters of the keras-hub layers whose scores can be recomputed
_PLAIN_SIGNATURE = ("query", "key", "value", "attention_mask")


def is_multi_head_attention(layer: Any) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention)


def is_attention_layer(layer: Any) -> bool:
    """``MultiHeadAttention``, or a layer with keras-hub's attention methods."""
    if is_multi_head_attention(layer):
        return True
    return callable(getattr(type(layer), "_compute_attention", None)) and callable(
        getattr(type(layer), "_masked_softmax", None))


def scores_layers(layer: Any) -> set[int]:
    """ids of the sublayers of attention ``layer`` that see its (batch, head, query, key)
    scores: the softmax, and in ``MultiHeadAttention`` the dropout applied to the scores
    (keras-hub layers apply theirs to the attended values)."""
    found = {id(getattr(layer, "_softmax", None))}
    if is_multi_head_attention(layer):
        found.add(id(getattr(layer, "_dropout_layer", None)))
    return found - {id(None)}


def attention_kind(layer: Any, call: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> str | None:
    """``self`` when an attention call's query, key and value come from one tensor, ``cross``
    when they do not, None when the call's arguments do not say."""
    try:
        named = inspect.signature(call).bind(*args, **kwargs).arguments
    except TypeError:
        return None
    if is_multi_head_attention(layer):
        query, value = named.get("query"), named.get("value")
        if query is None or value is None:
            return None
        key = named.get("key")
        same = value is query and (key is None or key is query)
        return "self" if same else "cross"
    # keras-hub layers take one hidden-state tensor; the encoder-decoder ones take the
    # encoder's states beside it
    for name in ("encoder_hidden_states", "key_value_states", "context"):
        if name in named:
            return "self" if named[name] is None else "cross"
    return "self" if "hidden_states" in named or len(args) == 1 else None


def probabilities(layer: Any, query: Any, key: Any, value: Any, attention_mask: Any = None,
                  use_causal_mask: bool = False) -> Any:
    """The softmax scores ``MultiHeadAttention``'s explicit path computes, (batch, head, q, k)."""
    if use_causal_mask:
        causal = layer._compute_causal_mask(query, value)
        attention_mask = causal if attention_mask is None else ops.logical_and(
            ops.cast(attention_mask, "bool"), causal)
    scaled = ops.multiply(query, ops.cast(layer._inverse_sqrt_key_dim, query.dtype))
    scores = ops.einsum(layer._dot_product_equation, key, scaled)
    return layer._masked_softmax(scores, attention_mask)


def tapped_compute_attention(layer: Any, original: Callable[..., Any],
                             take: Callable[[Any], None]) -> Callable[..., Any]:
    """A drop-in ``_compute_attention`` of a ``MultiHeadAttention`` that hands the
    probabilities to ``take``."""
    signature = inspect.signature(original)

    def compute_attention(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        scores = result[1] if isinstance(result, tuple) and len(result) == 2 else None
        if scores is None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            named = bound.arguments
            scores = probabilities(
                layer, named["query"], named["key"], named["value"],
                named.get("attention_mask"), bool(named.get("use_causal_mask", False)),
            )
        take(scores)
        return result

    compute_attention.__wrapped__ = original  # type: ignore[attr-defined]
    return compute_attention


class HubAttentionTap:
    """The ``_compute_attention`` and ``_masked_softmax`` replacements of one keras-hub
    attention layer; ``take`` receives the probabilities of each call."""

    def __init__(self, layer: Any, take: Callable[[Any], None],
                 warn: Callable[[str], None]) -> None:
        self.layer = layer
        self.take = take
        self.warn = warn
        self.compute = layer._compute_attention
        self.softmax = layer._masked_softmax
        self.seen: list[Any] | None = None  # softmax outputs of the call in progress

    def recomputable(self) -> bool:
        params = tuple(inspect.signature(self.compute).parameters)
        return (params == _PLAIN_SIGNATURE and hasattr(self.layer, "_inv_norm_factor")
                and isinstance(getattr(self.layer, "_dot_product_equation", None), str))

    def recompute(self, query: Any, key: Any, attention_mask: Any = None) -> Any:
        """The explicit path of the layer (Llama's, Mistral's, ...): scaled dot product, then
        the layer's own masked softmax."""
        layer = self.layer
        scores = ops.einsum(layer._dot_product_equation, query, key)
        scores = ops.multiply(scores, ops.cast(layer._inv_norm_factor, layer.compute_dtype))
        return self.softmax(scores, attention_mask)

    def masked_softmax(self, *args: Any, **kwargs: Any) -> Any:
        result = self.softmax(*args, **kwargs)
        if self.seen is not None:
            self.seen.append(result)
        return result

    def compute_attention(self, *args: Any, **kwargs: Any) -> Any:
        outer, self.seen = self.seen, []
        try:
            result = self.compute(*args, **kwargs)
            seen = self.seen
        finally:
            self.seen = outer
        if seen:
            self.take(seen[-1])
        elif self.recomputable():
            named = inspect.signature(self.compute).bind(*args, **kwargs).arguments
            self.take(self.recompute(named["query"], named["key"],
                                     named.get("attention_mask")))
        else:
            self.warn(f"{type(self.layer).__name__} computed its attention with a fused kernel "
                      "that returns no probabilities; its map is not captured")
        return result
