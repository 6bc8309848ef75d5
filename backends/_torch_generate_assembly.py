"""Putting the steps of one ``generate`` call together: each variable along its position axes,
and the token coordinates of the final sequences (see ``_torch_generate`` for the rules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_QUERY_ROLES = ("token", "query")
_KEY_ROLE = "key"

#: one step's value of a variable: (first position fed, tokens fed, host array, roles)
Part = tuple[int, int, np.ndarray, tuple[str, ...]]


@dataclass(frozen=True)
class TokenLabels:
    """The ``token`` axis of the stored sequences: ``ids``, ``steps`` (0 for the prompt, k for
    the k-th generated token) and ``mask`` (True for real tokens), all (batch, token)."""

    ids: np.ndarray
    steps: np.ndarray
    mask: np.ndarray

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True)
class Assembled:
    values: np.ndarray
    filled: str  # what the positions no step computed hold, and why; "" when none


def token_labels(sequences: torch.Tensor, prompt_length: int, prompt_mask: torch.Tensor,
                 total_length: int | None, pad_token_id: int,
                 eos_token_ids: Sequence[int]) -> TokenLabels:
    """Labels for ``sequences`` (prompt + generated), padded with ``pad_token_id`` up to
    ``total_length`` (prompt + max_new_tokens) when generation stopped early, so that calls
    with the same settings give samples of one length."""
    ids = sequences.numpy().astype(np.int64)
    batch, length = ids.shape
    total = max(length, total_length or 0)
    if total > length:
        ids = np.concatenate([ids, np.full((batch, total - length), pad_token_id, np.int64)], 1)
    steps = np.broadcast_to(np.maximum(np.arange(total) - prompt_length + 1, 0),
                            (batch, total)).astype(np.int64)
    generated = ids[:, prompt_length:length]
    # a token is real until the first end-of-sequence token (which is real) has been made
    ended = np.isin(generated, np.asarray(eos_token_ids, np.int64)) if eos_token_ids else \
        np.zeros_like(generated, dtype=bool)
    ended_before = np.cumsum(ended, axis=1) - ended > 0
    mask = np.zeros((batch, total), dtype=bool)
    mask[:, :prompt_length] = prompt_mask.numpy().astype(bool)
    mask[:, prompt_length:length] = ~ended_before
    return TokenLabels(ids, steps, mask)


def assemble(parts: list[Part], length: int, fed: int, prompt_length: int,
             prefix: str = "") -> Assembled | str:
    """One variable's steps placed at their absolute positions on axes of ``length``; a string
    says why it cannot be (stored in the trace's ``skipped`` record instead). ``fed``: the
    tokens fed to the model over all steps; ``prefix``: ``decoder_`` where the generated
    positions are an encoder-decoder model's decoder axes (``decoder_token``, ...)."""
    roles = parts[0][3]
    query_roles = tuple(prefix + role for role in _QUERY_ROLES)
    key_role = prefix + _KEY_ROLE
    positional = [axis for axis, role in enumerate(roles) if role in (*query_roles, key_role)]
    if not positional:  # the encoder's pass, or values on the encoder's positions only
        first = parts[0][2]
        if all(np.array_equal(value, first, equal_nan=True) for _, _, value, _ in parts[1:]):
            return Assembled(first, "")
        return ("one value per generate() step and no token axis to place it on; trace a "
                "forward pass to store it")
    shape = list(parts[0][2].shape)
    for _, _, value, part_roles in parts:
        if len(part_roles) != len(roles) or any(
                value.shape[axis] != shape[axis] for axis in range(len(roles))
                if axis not in positional):
            return "its shape changes between generate() steps beyond the token axes"
    for axis in positional:
        shape[axis] = length
    dtype = parts[0][2].dtype
    floating = np.issubdtype(dtype, np.floating)
    values = np.full(shape, np.nan if floating else 0, dtype=dtype)
    queries = [axis for axis in positional if roles[axis] in query_roles]
    keys = [axis for axis in positional if roles[axis] == key_role]
    covered = np.zeros(length, dtype=bool)
    for start, count, value, _ in parts:
        placed = _placement(value, positional, keys, start + count, length)
        if isinstance(placed, str):
            return placed
        source, target = placed
        if keys and queries:  # the step's rows: keys it had no key for were not attended
            rows = tuple(np.arange(n) if axis not in queries else target[axis]
                         for axis, n in enumerate(shape))
            values[np.ix_(*rows)] = 0
        values[np.ix_(*target)] = value[np.ix_(*source)]
        for axis in queries or positional:
            covered[target[axis]] = True
    return Assembled(values, filled_note(covered, fed, prompt_length, bool(keys and queries),
                                     floating))


def _placement(value: np.ndarray, positional: list[int], keys: list[int], end: int,
               length: int) -> tuple[list[np.ndarray], list[np.ndarray]] | str:
    """(source, target) indices per axis of one step's value."""
    source = [np.arange(n) for n in value.shape]
    target = [np.arange(n) for n in value.shape]
    for axis in positional:
        count = value.shape[axis]
        if axis in keys and count > end:
            first = 0  # a preallocated (static) cache: its slots are the absolute positions
        elif count > end:
            return (f"its axis {axis} ({count} positions) is longer than the {end} tokens fed "
                    "so far in generate()")
        else:
            first = end - count  # the last positions: the step's own, or a window's keys
        positions = np.arange(first, first + count)
        inside = positions < length
        source[axis], target[axis] = np.arange(count)[inside], positions[inside]
    return source, target


def filled_note(covered: np.ndarray, fed: int, prompt_length: int, attention: bool,
            floating: bool) -> str:
    fill = "NaN" if floating else "0"
    notes: list[str] = []
    missing = np.flatnonzero(~covered)
    fed_missing = missing[missing < fed]
    if fed_missing.size:
        where = "prompt " if fed_missing.max() < prompt_length else ""
        notes.append(f"{where}{_ranges(fed_missing)} hold {fill}: the model was fed them but "
                     "did not compute this variable there (generate() asks for the logits "
                     "of each step's last position only)")
    never_fed = missing[missing >= fed]
    if never_fed.size:
        notes.append(f"{_ranges(never_fed)} hold {fill}: generate() never fed them "
                     "to the model (the last generated token, and the padding after a "
                     "generation that stopped early)")
    if attention:
        notes.append("keys a step did not hold (later positions, or positions a sliding-window "
                     "cache had dropped) hold 0: they were not attended")
    return "; ".join(notes)


def _ranges(positions: np.ndarray) -> str:
    """``positions 0-4, 9`` for [0, 1, 2, 3, 4, 9]; ``position 9`` for [9]."""
    spans: list[list[Any]] = []
    for position in positions.tolist():
        if spans and position == spans[-1][1] + 1:
            spans[-1][1] = position
        else:
            spans.append([position, position])
    listed = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"position{'s' if positions.size > 1 else ''} {listed}"
