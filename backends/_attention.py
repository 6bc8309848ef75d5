"""Attention probabilities from PyTorch attention modules.

Eager attention returns its softmax weights; fused ``scaled_dot_product_attention`` does not.
While attached, the tap wraps ``torch.nn.functional.scaled_dot_product_attention`` and, for a
call made inside a selected attention module, recomputes ``softmax(q k^T * scale + mask)`` with
the same operations eager attention uses, so both paths agree to float round-off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional

_NOT_ATTENTION = ("Output", "Mask", "Bias", "Rotary", "Embedding", "Norm", "Pool")


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        return True
    return "Attention" in name and not any(part in name for part in _NOT_ATTENTION)


def is_attention_module(module: nn.Module) -> bool:
    """Innermost attention modules: attention-named, with no attention module inside."""
    if not _looks_like_attention(module):
        return False
    return not any(_looks_like_attention(m) for m in module.modules() if m is not module)


def probabilities_from_output(tensor: torch.Tensor, output: Any) -> bool:
    """Whether ``tensor`` (an element after the first of a module's output tuple) is an
    attention map: (batch, head, query, key) or (batch, query, key), rows summing to one."""
    if not isinstance(output, (tuple, list)) or tensor.dim() not in (3, 4):
        return False
    if not tensor.is_floating_point():
        return False
    first = output[0]
    if isinstance(first, torch.Tensor) and first.dim() >= 2 and tensor.shape[0] != first.shape[0]:
        return False
    return True


def recompute_probabilities(query: torch.Tensor, key: torch.Tensor, attn_mask: Any = None,
                            is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False) -> torch.Tensor:
    """The softmax ``scaled_dot_product_attention`` applies internally, as eager code writes it."""
    if scale is None:
        scale = query.size(-1) ** -0.5
    if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
    weights = torch.matmul(query, key.transpose(-2, -1))
    weights.mul_(scale)  # in place, here and below: the same arithmetic with no new buffers
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        weights.masked_fill_(~causal, float("-inf"))
    if attn_mask is not None:
        if torch.broadcast_shapes(weights.shape, attn_mask.shape) != weights.shape:
            weights = weights.expand(torch.broadcast_shapes(weights.shape, attn_mask.shape))
            weights = weights.clone()
        if attn_mask.dtype == torch.bool:
            weights.masked_fill_(~attn_mask, float("-inf"))
        else:
            weights.add_(attn_mask)
    return torch.softmax(weights, dim=-1, out=weights)


class AttentionTap:
    """Tracks which selected attention module is running and collects its probabilities."""

    def __init__(self) -> None:
        self._stack: list[nn.Module] = []
        self._taken: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self._stack.clear()
        self._taken.clear()

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._stack.append(module)

    def pop(self, module: nn.Module) -> torch.Tensor | None:
        while self._stack:
            if self._stack.pop() is module:
                break
        return self._taken.pop(id(module), None)

    def _record(self, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if not self._stack:
            return
        names = ("value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args, strict=False)) | kwargs
        with torch.no_grad():
            probs = recompute_probabilities(
                query, key, bound.get("attn_mask"), bool(bound.get("is_causal", False)),
                bound.get("scale"), bool(bound.get("enable_gqa", False)),
            )
        self._taken[id(self._stack[-1])] = probs

    @contextmanager
    def patched(self, active: bool) -> Iterator[None]:
        """Wrap ``scaled_dot_product_attention`` for the block; always restored."""
        if not active:
            yield
            return
        original = functional.scaled_dot_product_attention

        def tapped(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._record(query, key, *args, **kwargs)
            return original(query, key, *args, **kwargs)

        functional.scaled_dot_product_attention = tapped
        try:
            yield
        finally:
            functional.scaled_dot_product_attention = original


def multihead_weights(module: nn.MultiheadAttention, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> torch.Tensor:
    """Per-head weights of an ``nn.MultiheadAttention`` call that did not return them.

    Asking the traced call itself for weights would switch it to another kernel and change
    its output; a second call with the same inputs leaves the model's results untouched.
    """
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    bound = dict(zip(names, args, strict=False)) | kwargs
    bound.update(need_weights=True, average_attn_weights=False)
    with torch.no_grad():
        _, weights = module.forward(**bound)
    assert weights is not None  # need_weights=True always returns them
    return weights
