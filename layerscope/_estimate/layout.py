"""From the probe to a trace of N samples: the chunk files, manifests and metadata documents
the writer would make, by the writer's own chunk rule (``core.chunking.chunk_shape``).

A chunk holds whole samples along ``batch`` and whole trailing chunks; zarr writes every chunk
at its full shape, so a token axis chunked past its length (``core.growth.token_chunk``) and
the last, partly filled chunk along ``batch`` cost their fill values too: in full where the
writer stores a variable as it is, next to nothing where it compresses it. What a compressed
sample costs is measured on the probe's own chunk files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from layerscope.core.chunking import ChunkPolicy, chunk_shape

from .probe import Probe, ProbedArray

BLOSC_HEADER = 16  # bytes a Blosc frame adds to a chunk
CHECKSUM_BYTES = 4  # the crc32c trailer of every chunk file
TEXT_HEADER = 4  # zarr's variable-length string codec: the element count


@dataclass(frozen=True)
class Footprint:
    """What one array (or the whole store) takes for N samples."""

    raw: int  # the values, uncompressed, at their logical shape
    stored: int  # bytes in files
    allocated: int  # bytes of disk those files occupy (each rounded up to whole blocks)
    files: int
    manifest: int = 0  # bytes its chunk files add to the batches' checksum manifests


def rounded(size: float, block: int) -> int:
    """Disk a file of ``size`` bytes occupies: whole blocks."""
    return -(-math.ceil(size) // block) * block if size > 0 else 0


def batch_sizes(samples: int, first: int) -> np.ndarray:
    """Batches of ``first`` samples, the last one the rest: how a trace of ``samples``
    samples runs (one forward pass per batch)."""
    count = -(-samples // first)
    sizes = np.full(count, first, dtype=np.int64)
    sizes[-1] = samples - first * (count - 1)
    return sizes


def array_footprint(array: ProbedArray, batches: np.ndarray, policy: ChunkPolicy,
                    block: int) -> Footprint:
    samples = int(batches.sum())
    chunks = chunk_shape((0, *array.trailing), array.dims, array.itemsize, int(batches[0]),
                         policy)
    rows, inner = chunks[0], chunks[1:]
    per_row = math.prod(-(-n // c) for n, c in zip(array.trailing, inner, strict=True))
    chunk_rows = -(-samples // rows)
    filled_last = samples - rows * (chunk_rows - 1)
    overhead = CHECKSUM_BYTES * array.checksum
    if array.compressed or array.text:
        overhead += BLOSC_HEADER * array.compressed + TEXT_HEADER * array.text
        measured = sum(array.chunk_files) - overhead * len(array.chunk_files)
        per_sample = max(0.0, measured / max(1, array.rows))
        full = rows * per_sample / per_row + overhead
        last = filled_last * per_sample / per_row + overhead  # fill values: next to nothing
    else:
        full = last = rows * math.prod(inner) * array.itemsize + overhead
    stored = per_row * ((chunk_rows - 1) * full + last)
    allocated = per_row * ((chunk_rows - 1) * rounded(full, block) + rounded(last, block))
    if array.text:
        raw = samples * array.text_bytes / max(1, array.rows)
    else:
        raw = samples * math.prod(array.trailing) * array.itemsize
    # every batch lists each chunk file it wrote (a chunk two batches share: in both)
    ends = np.cumsum(batches)
    touched = int(((ends - 1) // rows - (ends - batches) // rows + 1).sum()) * per_row
    digits = len(str(chunk_rows - 1)) - 1  # chunk keys and sizes grow a little
    manifest = touched * (array.manifest_entry_bytes + digits) if array.manifest_entry_bytes else 0
    return Footprint(round(raw), round(stored) + array.metadata_bytes,
                     allocated + rounded(array.metadata_bytes, block) + block,  # + its folder
                     chunk_rows * per_row + 1, round(manifest))


def store_footprint(probe: Probe, batches: np.ndarray, policy: ChunkPolicy, block: int,
                    lock_bytes: int) -> tuple[Footprint, dict[str, Footprint]]:
    """The whole store's footprint, and each array's."""
    arrays = {array.name: array_footprint(array, batches, policy, block)
              for array in probe.arrays}
    stored = sum(f.stored for f in arrays.values()) + probe.root_bytes + lock_bytes
    allocated = sum(f.allocated for f in arrays.values()) + rounded(probe.root_bytes, block) \
        + rounded(lock_bytes, block) + block * (2 if lock_bytes else 1)  # the root folders
    files = sum(f.files for f in arrays.values()) + 1 + (1 if lock_bytes else 0)
    if probe.manifests:
        count = len(batches)
        bytes_ = sum(f.manifest for f in arrays.values()) \
            + count * len('{"batch": , "chunks": {}}') + _digits_up_to(count)
        stored += bytes_
        allocated += count * rounded(bytes_ / count, block) + block  # + their folder
        files += count
    raw = sum(f.raw for f in arrays.values())
    return Footprint(raw, stored, allocated, files), arrays


def _digits_up_to(count: int) -> int:
    """The digits of 0, 1, ..., count - 1 written out."""
    total, width, start = 0, 1, 0
    while start < count:
        stop = min(count, 10 ** width)
        total += (stop - start) * width
        start, width = stop, width + 1
    return total
