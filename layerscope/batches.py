"""Turning what a user passes to ``capture`` into forward calls (one batch each)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerscope.core import LayerscopeError


@dataclass(frozen=True)
class Call:
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None


@dataclass(frozen=True)
class Calls:
    calls: list[Call]

    def __len__(self) -> int:
        return len(self.calls)

    def progress(self, show: bool) -> Iterator[Call]:
        if not show:
            return iter(self.calls)
        from tqdm.auto import tqdm

        return iter(tqdm(self.calls, desc="tracing", unit="batch"))


@dataclass(frozen=True)
class TextPairs:
    """Input texts for an encoder-decoder model (T5, BART) with one target text each.

    The decoder reads each target as in training (what the model does itself when given
    ``labels``): the target's token ids shifted right by one behind
    ``decoder_start_token_id``, so the logits at decoder position i predict target token i.
    Targets are padded to one length, at least ``decoder_pad_to`` when appending to a store."""

    texts: Sequence[str]
    targets: Sequence[str]
    decoder_start_token_id: int
    decoder_pad_to: int | None = None

    def __post_init__(self) -> None:
        if not self.texts:
            raise LayerscopeError("inputs are empty: nothing to run")
        if len(self.texts) != len(self.targets):
            raise LayerscopeError(
                f"give one target text per input text: {len(self.texts)} texts, "
                f"{len(self.targets)} targets"
            )


def is_texts(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(
        isinstance(t, str) for t in inputs
    )


def _encode(tokenizer: Any, texts: Sequence[str], target: bool, **kwargs: Any) -> Any:
    """Targets go through ``text_target``: tokenizers with a separate target vocabulary
    (Marian) switch to it there."""
    if target:
        return tokenizer(text_target=list(texts), **kwargs)
    return tokenizer(list(texts), **kwargs)


def _padded_length(tokenizer: Any, texts: Sequence[str], max_length: int | None,
                   pad_to: int | None, target: bool = False) -> int:
    """One length for every batch (so each appends to the same arrays): the longest text's
    after truncation (``max_length``), at least ``pad_to`` (the length of a store being
    appended to: a longer text grows the store, never cut to it)."""
    limit = max_length or getattr(tokenizer, "model_max_length", None) or 512
    limit = min(int(limit), 1_000_000)
    encoded = _encode(tokenizer, texts, target, truncation=True, max_length=limit)
    return max(pad_to or 0, *(len(ids) for ids in encoded["input_ids"]))


def _check(tokenizer: Any, batch_size: int) -> None:
    if tokenizer is None:
        raise LayerscopeError("text inputs need a tokenizer: pass tokenizer=...")
    if batch_size < 1:
        raise LayerscopeError(f"batch_size must be at least 1, not {batch_size}")


def tokenize(tokenizer: Any, texts: Sequence[str], batch_size: int,
             max_length: int | None = None, pad_to: int | None = None) -> list[Call]:
    """Tokenize ``texts`` to one padded length: the longest text's, or ``pad_to``."""
    _check(tokenizer, batch_size)
    length = _padded_length(tokenizer, texts, max_length, pad_to)
    calls = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=length,
                            return_tensors="np")
        calls.append(Call(kwargs=dict(encoded), texts=chunk))
    return calls


def tokenize_pairs(tokenizer: Any, pairs: TextPairs, batch_size: int,
                   max_length: int | None = None, pad_to: int | None = None) -> list[Call]:
    """Each call: the texts' encoding plus ``decoder_input_ids`` and
    ``decoder_attention_mask`` built from the targets (see :class:`TextPairs`)."""
    calls = tokenize(tokenizer, pairs.texts, batch_size, max_length, pad_to)
    length = _padded_length(tokenizer, pairs.targets, max_length, pairs.decoder_pad_to,
                            target=True)
    for index, call in enumerate(calls):
        start = index * batch_size
        targets = list(pairs.targets[start:start + batch_size])
        encoded = _encode(tokenizer, targets, True, padding="max_length", truncation=True,
                          max_length=length, return_tensors="np")
        ids = np.asarray(encoded["input_ids"])
        mask = np.asarray(encoded.get("attention_mask", np.ones_like(ids)))
        call.kwargs["decoder_input_ids"] = _shift_right(ids, pairs.decoder_start_token_id)
        call.kwargs["decoder_attention_mask"] = _shift_right(mask, 1)
    return calls


def _shift_right(values: np.ndarray, first: int) -> np.ndarray:
    """``values`` moved one place right along the tokens, ``first`` in the freed place."""
    column = np.full((values.shape[0], 1), first, dtype=values.dtype)
    return np.concatenate([column, values[:, :-1]], axis=1)


def plan_calls(inputs: Any, tokenizer: Any, batch_size: int,
               max_length: int | None = None, pad_to: int | None = None) -> Calls:
    if is_texts(inputs):
        return Calls(tokenize(tokenizer, inputs, batch_size, max_length, pad_to))
    if isinstance(inputs, TextPairs):
        return Calls(tokenize_pairs(tokenizer, inputs, batch_size, max_length, pad_to))
    if isinstance(inputs, dict):
        return Calls([Call(kwargs=dict(inputs))])
    if hasattr(inputs, "shape"):
        return Calls([Call(args=(inputs,))])
    if isinstance(inputs, str):
        return Calls(tokenize(tokenizer, [inputs], batch_size, max_length, pad_to))
    try:
        items = list(inputs)
    except TypeError:
        raise LayerscopeError(
            f"cannot run a model on a {type(inputs).__qualname__}: pass a list of strings, a dict "
            "of tensors, a tensor, or a list of those"
        ) from None
    calls: list[Call] = []
    for item in items:
        calls.extend(plan_calls(item, tokenizer, batch_size, max_length, pad_to).calls)
    if not calls:
        raise LayerscopeError("inputs are empty: nothing to run")
    return Calls(calls)
