"""Encoder-decoder Flax models: which stack's positions each array indexes.

In a model with both an ``encoder`` and a ``decoder`` stack (segments of its module paths),
the format names the decoder's positions ``decoder_token`` / ``decoder_query`` /
``decoder_key`` and keeps ``token`` / ``query`` / ``key`` for the encoder's. Which side an
array is on is decided by where it came from, never by its length (a source and a target of
the same length look alike):

- by identity during the pass: the root's token ids are the encoder's and its
  ``decoder_input_ids`` / ``labels`` the decoder's; an array handed on unchanged keeps its
  side; the keys and values handed to a Flax cross-attention are the other side's than its
  queries;
- Flax's own position-wise modules (linear layers, embeddings, norms, dropout, attention,
  whose output follows its queries) are on their first input's side;
- otherwise by the stack the module sits in;
- anything else (outside both stacks, made from nothing known: the root's own arithmetic)
  gets neutral names (``axis<i>``) for its token axes: a wrong side is worse than none.

An attention map's query axis is on its queries' side; self-attention's key axis too,
cross-attention's on the other side, and where self or cross cannot be told, neutral.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from layerscope.core.naming import DECODER_PREFIX, STACKS, default_roles, stack_of

from ._jax_attention import is_attention_name
from ._jax_dims import flax_classes

ENCODER, DECODER = STACKS
_TOKEN_ROLES = ("token", "query", "key")
#: root keywords that hold the decoder's token ids
DECODER_ID_ARGUMENTS = ("decoder_input_ids", "labels")
#: Flax modules whose output indexes the positions of their first input
_POSITIONWISE = (
    "Linear", "LinearGeneral", "Dense", "DenseGeneral", "Einsum", "Embed", "LayerNorm",
    "RMSNorm", "BatchNorm", "GroupNorm", "Dropout", "MultiHeadAttention",
    "MultiHeadDotProductAttention",
)


def is_encoder_decoder(model: Any, modules: Iterable[tuple[str, Any]]) -> bool:
    """A model whose config says so (``is_encoder_decoder``), or whose ``encoder`` and
    ``decoder`` stacks both hold attention (a language model whose embedding is called
    ``encoder`` and whose output layer ``decoder`` is not one)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
        return True
    with_attention = {stack_of(site) for site, module in modules
                      if is_attention_name(type(module).__name__)}
    return ENCODER in with_attention and DECODER in with_attention


def side_of(roles: tuple[str, ...] | None) -> str | None:
    """The side whose positions ``roles`` index, from how their token axes are named."""
    if not roles:
        return None
    if any(role.startswith(DECODER_PREFIX) for role in roles):
        return DECODER
    return ENCODER if any(role in _TOKEN_ROLES for role in roles) else None


def other(side: str | None) -> str | None:
    return {ENCODER: DECODER, DECODER: ENCODER}.get(side) if side is not None else None


def _neutral(ndim: int) -> tuple[str, ...]:
    # never "batch" for a first axis of unknown side (a time-major array): batch is named once
    return ("axis0", *default_roles(ndim)[1:])


def named(roles: tuple[str, ...], side: str | None) -> tuple[str, ...]:
    """Plain ``roles`` with their token axes named for ``side``; neutral when unknown."""
    neutral = _neutral(len(roles))
    out = []
    for index, role in enumerate(roles):
        if role not in _TOKEN_ROLES or side == ENCODER:
            out.append(role)
        elif side == DECODER:
            out.append(DECODER_PREFIX + role)
        else:
            out.append(neutral[index])
    return tuple(out)


def attention_roles(roles: tuple[str, ...], query_side: str | None,
                    kind: str | None) -> tuple[str, ...]:
    """(batch, head, query, key) named for the queries' side and for self or cross."""
    key_side = query_side if kind == "self" else other(query_side) if kind == "cross" else None
    sides = {"query": query_side, "key": key_side}
    neutral = _neutral(len(roles))
    out = []
    for index, role in enumerate(roles):
        side = sides.get(role, ENCODER)
        if role in sides and side is None:
            out.append(neutral[index])
        else:
            out.append(DECODER_PREFIX + role if role in sides and side == DECODER else role)
    return tuple(out)


def output_side(module: Any, site: str, input_side: str | None) -> str | None:
    """The side of a module's output that is not an array it was handed."""
    if input_side is not None and isinstance(module, flax_classes(*_POSITIONWISE)):
        return input_side
    return stack_of(site)
