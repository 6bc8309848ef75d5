"""Attention probabilities from PyTorch attention modules.

Eager attention returns its softmax weights; fused ``scaled_dot_product_attention`` does not.
While attached, the tap wraps ``torch.nn.functional.scaled_dot_product_attention`` and, for a
call made inside a selected attention module, recomputes ``softmax(q k^T * scale + mask)`` with
the same operations eager attention uses, so both paths agree to float round-off.

A tensor an attention module returns is taken as its probabilities only when the module itself
computed it: the output of a softmax over the last axis that ran inside the module (also through
``nn.functional.softmax`` or ``nn.Softmax``), that output after dropout, or that output cast to
another dtype. The tap wraps ``Tensor.softmax``, ``torch.softmax`` and
``nn.functional.dropout`` for the block to see them. A tensor of the right shape that no softmax
produced (T5's relative position bias, (1, head, query, key)) is an output, never attention.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from ._patches import wrapped

_SOFTMAX = torch.softmax  # the original, also while the tap wraps it
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


def recompute_probabilities(query: torch.Tensor, key: torch.Tensor, attn_mask: Any = None,
                            is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False) -> torch.Tensor:
    """The softmax ``scaled_dot_product_attention`` applies internally, as eager code writes it,
    in float32 for half-precision models and outside autocast, so the stored probabilities
    are as exact as eager attention's (which takes its softmax in float32)."""
    with torch.autocast(query.device.type, enabled=False):
        return _probabilities(_float32(query), _float32(key), _float32(attn_mask), is_causal,
                              scale, enable_gqa)


def _float32(tensor: Any) -> Any:
    if isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def _probabilities(query: torch.Tensor, key: torch.Tensor, attn_mask: Any, is_causal: bool,
                   scale: float | None, enable_gqa: bool) -> torch.Tensor:
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
    # a query whose every key is masked (left padding) gets zeros from SDPA's own softmax, not NaN
    unattended = torch.isneginf(weights).all(-1, keepdim=True) \
        if is_causal or attn_mask is not None else None
    probabilities = _SOFTMAX(weights, dim=-1, out=weights)
    if unattended is not None:
        probabilities.masked_fill_(unattended, 0.0)
    return probabilities


def unpacked_gqa(module: nn.Module, query: torch.Tensor,
                 probabilities: torch.Tensor) -> torch.Tensor:
    """Probabilities of a one-token query whose heads transformers packed onto the key/value
    heads before SDPA (grouped-query attention: (batch, kv_heads, groups, dim)) back as
    (batch, head, 1, key); any other probabilities unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not (isinstance(groups, int) and groups > 1 and isinstance(heads, int)):
        return probabilities
    if probabilities.dim() != 4 or query.size(-3) * groups != heads or query.size(-2) != groups:
        return probabilities  # queries with all their heads: not packed
    return probabilities.reshape(probabilities.size(0), heads, 1, probabilities.size(-1))


@dataclass
class Probabilities:
    """What the tap saw inside one call of an attention module."""

    recomputed: torch.Tensor | None = None  # from a fused kernel's query and key
    computed: list[torch.Tensor] = field(default_factory=list)  # softmax outputs, their dropouts

    def produced(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is one of the module's own softmax outputs (or its dropout or
        dtype cast), not merely a tensor of that shape."""
        for probs in self.computed:
            if tensor is probs:
                return True
            if tensor.shape != probs.shape:
                continue
            if tensor.dtype == probs.dtype:
                if tensor.data_ptr() == probs.data_ptr() and tensor.stride() == probs.stride():
                    return True  # a view of the very same memory
            elif tensor.is_floating_point() and torch.equal(tensor, probs.to(tensor.dtype)):
                return True  # softmax in float32, returned in the model's dtype
        return False


class AttentionTap:
    """Tracks which selected attention module is running and collects its probabilities."""

    def __init__(self) -> None:
        self._stack: list[nn.Module] = []
        self._taken: dict[int, Probabilities] = {}
        self._thread = threading.get_ident()

    def reset(self) -> None:
        self._stack.clear()
        self._taken.clear()

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._stack:
            self._thread = threading.get_ident()
        self._stack.append(module)

    def pop(self, module: nn.Module) -> Probabilities:
        while self._stack:
            if self._stack.pop() is module:
                break
        return self._taken.pop(id(module), None) or Probabilities()

    def _current(self) -> Probabilities | None:
        """The record of the innermost running attention module, on the model's thread."""
        if not self._stack or threading.get_ident() != self._thread:
            return None
        return self._taken.setdefault(id(self._stack[-1]), Probabilities())

    def _record(self, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        current = self._current()
        if current is None:
            return
        names = ("value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args, strict=False)) | kwargs
        with torch.no_grad():
            probabilities = recompute_probabilities(
                query, key, bound.get("attn_mask"), bool(bound.get("is_causal", False)),
                bound.get("scale"), bool(bound.get("enable_gqa", False)),
            )
            current.recomputed = unpacked_gqa(self._stack[-1], query, probabilities)

    def _softmaxed(self, result: Any, dim: Any) -> None:
        current = self._current()
        if current is None or not isinstance(result, torch.Tensor) or result.dim() not in (3, 4):
            return
        if isinstance(dim, int) and dim in (-1, result.dim() - 1):
            current.computed.append(result)

    def _dropped(self, source: Any, result: Any) -> None:
        current = self._current()
        if current is None or result is source or not isinstance(result, torch.Tensor):
            return
        if any(source is probs for probs in current.computed):
            current.computed.append(result)

    @contextmanager
    def patched(self, active: bool) -> Iterator[None]:
        """Wrap ``scaled_dot_product_attention``, softmax and dropout for the block; always
        restored, also when traces on other threads end in another order."""
        if not active:
            yield
            return

        def tapped(original: Any) -> Any:
            def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor,
                                             *args: Any, **kwargs: Any) -> Any:
                self._record(query, key, *args, **kwargs)
                return original(query, key, *args, **kwargs)
            return scaled_dot_product_attention

        def softmaxed(original: Any) -> Any:
            def softmax(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                result = original(tensor, *args, **kwargs)
                self._softmaxed(result, args[0] if args else kwargs.get("dim"))
                return result
            return softmax

        def dropped(original: Any) -> Any:
            def dropout(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                result = original(tensor, *args, **kwargs)
                self._dropped(tensor, result)
                return result
            return dropout

        with wrapped(functional, "scaled_dot_product_attention", tapped), \
                wrapped(functional, "dropout", dropped), \
                wrapped(torch, "softmax", softmaxed), \
                wrapped(torch.Tensor, "softmax", softmaxed):
            yield


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
