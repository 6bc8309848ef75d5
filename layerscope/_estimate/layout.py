"""From the probe to a trace of N samples: the chunk files, manifests and metadata documents
the writer would make, by the writer's own chunk rule (``core.chunking.chunk_shape``).

A chunk holds whole samples along ``batch`` and whole trailing chunks; zarr writes every chunk
at its full shape, so a token axis chunked past its length (``core.growth.token_chunk``) and
the last, partly filled chunk along ``batch`` cost their fill values too: in full where the
writer stores a variable as it is, next to nothing where it compresses it. What a compressed
sample costs is measured on the probe's own chunk files. Small variables of a model traced at
many sites are gathered into chunks of several batches (``core.gather``): where the writer's
first batch would gather, their chunks are that many batches long, and the last one, stored
as it is, takes only the pages of its used rows (the rest of the file is a hole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from layerscope.core._rawfile import used_bytes
from layerscope.core.chunking import ChunkPolicy, chunk_shape
from layerscope.core.gather import GatherPolicy

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


@dataclass(frozen=True)
class Batches:
    """How a trace's samples are split into forward passes (one batch each), without a list
    of them: a trace of a billion samples is estimated in the time one of a thousand is."""

    samples: int
    first: int  # samples in the first batch: the writer's chunk sizes follow it
    count: int
    #: where each batch but the first starts; None: batches of ``first``, the last the rest
    starts: np.ndarray | None = None

    @classmethod
    def uniform(cls, samples: int, size: int) -> Batches:
        return cls(samples, min(size, samples), -(-samples // size))

    @classmethod
    def of(cls, sizes: list[int]) -> Batches:
        ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
        return cls(int(ends[-1]), int(sizes[0]), len(sizes), ends[:-1])

    def chunk_rows_written(self, rows: int) -> int:
        """(batch, chunk row) pairs where a batch writes into a chunk of ``rows`` samples: one
        chunk row per batch, and one more for each chunk row that starts inside a batch (a
        chunk two batches share is written by both)."""
        chunk_rows = -(-self.samples // rows)
        if self.starts is None:
            on_both = (self.samples - 1) // math.lcm(self.first, rows)
        else:
            on_both = int((self.starts % rows == 0).sum())
        return self.count + chunk_rows - 1 - on_both


def gathered_batches(probe: Probe, batches: Batches, policy: GatherPolicy
                     ) -> dict[str, int]:
    """Array name -> batches per chunk of each small variable, as the writer decides at the
    end of its first batch (``GatheredWrites.decide``); none where it would not gather. The
    blocks of a traced ``generate()`` are written in pieces, never gathered."""
    sizes = {array.name: batches.first * math.prod(array.trailing) * array.itemsize
             for array in probe.arrays if not array.text and not array.in_blocks}
    small = {name: size for name, size in sizes.items() if size <= policy.below}
    group = policy.group_batches(sum(small.values()), len(small))
    return dict.fromkeys(small, group) if group > 1 else {}


def array_footprint(array: ProbedArray, batches: Batches, policy: ChunkPolicy,
                    block: int, gathered: int = 1) -> Footprint:
    """``gathered``: batches per chunk of a small variable (see :func:`gathered_batches`)."""
    samples = batches.samples
    chunks = chunk_shape((0, *array.trailing), array.dims, array.itemsize, batches.first,
                         policy)
    rows, inner = chunks[0], chunks[1:]
    if gathered > 1:
        rows = gathered * batches.first
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
    last_allocated = rounded(last, block)
    if gathered > 1 and not array.compressed and not array.text:
        body = rows * math.prod(inner) * array.itemsize
        last_allocated = holed_allocation(body, rows, filled_last, overhead, block)
    allocated = per_row * ((chunk_rows - 1) * rounded(full, block) + last_allocated)
    if array.text:
        raw = samples * array.text_bytes / max(1, array.rows)
    else:
        raw = samples * math.prod(array.trailing) * array.itemsize
    touched = per_row * batches.chunk_rows_written(rows)  # each batch's manifest lists them
    digits = len(str(chunk_rows - 1)) - 1  # chunk keys and sizes grow a little
    manifest = touched * (array.manifest_entry_bytes + digits) if array.manifest_entry_bytes else 0
    return Footprint(round(raw), round(stored) + array.metadata_bytes,
                     allocated + rounded(array.metadata_bytes, block) + block,  # + its folder
                     chunk_rows * per_row + 1, round(manifest))


def holed_allocation(body: int, rows: int, used: int, trailer: int, block: int) -> int:
    """Disk a gathered chunk file of ``body`` bytes (``rows`` rows, ``used`` of them used)
    and a ``trailer`` occupies: only the pages of the used rows are written, the rest up to
    the trailer is a hole (``ChunkWriter.written_bytes``)."""
    written = used_bytes(body, used, rows)
    if written >= body:
        return rounded(body + trailer, block)
    blocks = -(-written // block)
    ends = {body // block, (body + trailer - 1) // block} if trailer else set()
    return block * (blocks + sum(1 for index in ends if index >= blocks))


def store_footprint(probe: Probe, batches: Batches, policy: ChunkPolicy, block: int,
                    lock_bytes: int, gathering: GatherPolicy
                    ) -> tuple[Footprint, dict[str, Footprint]]:
    """The whole store's footprint, and each array's."""
    gathered = gathered_batches(probe, batches, gathering)
    arrays = {array.name: array_footprint(array, batches, policy, block,
                                          gathered.get(array.name, 1))
              for array in probe.arrays}
    stored = sum(f.stored for f in arrays.values()) + probe.root_bytes + lock_bytes
    allocated = sum(f.allocated for f in arrays.values()) + rounded(probe.root_bytes, block) \
        + rounded(lock_bytes, block) + block * (2 if lock_bytes else 1)  # the root folders
    files = sum(f.files for f in arrays.values()) + 1 + (1 if lock_bytes else 0)
    if probe.manifests:
        count = batches.count
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
