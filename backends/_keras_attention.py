"""Attention probabilities from ``keras.layers.MultiHeadAttention`` (and the keras-hub layers
built on it, such as the BERT ``TransformerEncoder``).

``MultiHeadAttention._compute_attention`` returns its softmax scores only on its explicit path;
with no dropout and no scores asked for it calls the fused ``ops.dot_product_attention``, which
returns none. The tap wraps ``_compute_attention`` on the layer instance, lets the call run
unchanged (so the model's outputs are untouched) and, when no scores came back, recomputes them
with the same operations the explicit path uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from keras import ops


def probabilities(layer: Any, query: Any, key: Any, value: Any, attention_mask: Any = None,
                  use_causal_mask: bool = False) -> Any:
    """The softmax scores ``layer``'s explicit attention path computes, (batch, head, q, k)."""
    if use_causal_mask:
        causal = layer._compute_causal_mask(query, value)
        attention_mask = causal if attention_mask is None else ops.logical_and(
            ops.cast(attention_mask, "bool"), causal)
    scaled = ops.multiply(query, ops.cast(layer._inverse_sqrt_key_dim, query.dtype))
    scores = ops.einsum(layer._dot_product_equation, key, scaled)
    return layer._masked_softmax(scores, attention_mask)


def tapped_compute_attention(layer: Any, original: Callable[..., Any],
                             take: Callable[[Any], None]) -> Callable[..., Any]:
    """A drop-in ``_compute_attention`` for ``layer`` that hands the probabilities to ``take``."""
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
