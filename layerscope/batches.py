"""Turning what a user passes to ``capture`` into forward calls (one batch each)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def is_texts(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(
        isinstance(t, str) for t in inputs
    )


def tokenize(tokenizer: Any, texts: Sequence[str], batch_size: int,
             max_length: int | None = None, pad_to: int | None = None) -> list[Call]:
    """Tokenize ``texts`` to one padded length (so every batch appends to the same arrays):
    the longest text's, or ``pad_to`` (the length of a store being appended to)."""
    if tokenizer is None:
        raise LayerscopeError("text inputs need a tokenizer: pass tokenizer=...")
    if batch_size < 1:
        raise LayerscopeError(f"batch_size must be at least 1, not {batch_size}")
    limit = pad_to or max_length or getattr(tokenizer, "model_max_length", None) or 512
    limit = min(int(limit), 1_000_000)
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True,
                                              max_length=limit)["input_ids"]]
    length = pad_to or max(lengths)
    calls = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=length,
                            return_tensors="np")
        calls.append(Call(kwargs=dict(encoded), texts=chunk))
    return calls


def plan_calls(inputs: Any, tokenizer: Any, batch_size: int,
               max_length: int | None = None, pad_to: int | None = None) -> Calls:
    if is_texts(inputs):
        return Calls(tokenize(tokenizer, inputs, batch_size, max_length, pad_to))
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
