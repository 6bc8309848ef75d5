"""Chunk shapes: whole samples along ``batch``, trailing dims whole where they fit.

A chunk aims at ``target_bytes`` (inside the 1-16 MB band) uncompressed. A sample larger than
``max_bytes`` is split along ``head`` first, then ``query`` (so one head of a long attention map
is read without its neighbours), then along the largest remaining axis. A token axis, which
later passes may grow (:mod:`.growth`), is chunked at the next power of two of its first
length (at least 16), so growth adds few chunks and every chunk stays within the band.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .growth import is_token_axis, token_chunk

MB = 1 << 20


@dataclass(frozen=True)
class ChunkPolicy:
    target_bytes: int = 8 * MB
    max_bytes: int = 16 * MB


def chunk_shape(
    shape: tuple[int, ...],
    dims: tuple[str, ...],
    itemsize: int,
    batch_size: int,
    policy: ChunkPolicy = ChunkPolicy(),
    fixed: dict[int, int] | None = None,
) -> tuple[int, ...]:
    """Choose the chunk shape of a variable whose first axis is ``batch``.

    Samples per chunk never exceed ``batch_size`` (the first batch appended), so that
    appends of equal batches fill whole chunks and never rewrite a chunk already written.
    ``fixed``: {axis past batch: chunk length} set by the caller (an axis written in pieces of
    that length, :mod:`.region`); the other axes are split around it.
    """
    return _chunk_shape(tuple(shape), tuple(dims), itemsize, batch_size, policy,
                        tuple(sorted(fixed.items())) if fixed else ())


@functools.lru_cache(maxsize=1024)  # a store of a thousand variables has a few layouts
def _chunk_shape(shape: tuple[int, ...], dims: tuple[str, ...], itemsize: int, batch_size: int,
                 policy: ChunkPolicy, fixed_axes: tuple[tuple[int, int], ...]
                 ) -> tuple[int, ...]:
    fixed = dict(fixed_axes)
    trailing = [fixed[i] if i in fixed else token_chunk(n) if is_token_axis(dim) else max(1, n)
                for i, (n, dim) in enumerate(zip(shape[1:], dims[1:], strict=True))]
    if _nbytes(trailing, itemsize) > policy.max_bytes:  # a model of a thousand sites: rarely
        preferred = ("head", "query")
        split_order = sorted(
            (i for i in range(len(trailing)) if i not in fixed),
            key=lambda i: (next((k for k, p in enumerate(preferred)
                                 if dims[i + 1].startswith(p)), len(preferred)),
                           -max(1, shape[i + 1])),
        )
        for axis in split_order:
            while _nbytes(trailing, itemsize) > policy.max_bytes and trailing[axis] > 1:
                trailing[axis] = (trailing[axis] + 1) // 2
    per_sample = _nbytes(trailing, itemsize)
    samples = max(1, min(batch_size, policy.target_bytes // per_sample))
    return (samples, *trailing)


def _nbytes(shape: list[int], itemsize: int) -> int:
    n = itemsize
    for size in shape:
        n *= size
    return n
