"""One variable of a traced ``generate()``, written as its steps come (see ``_torch_generate``
for where each step's values go).

A variable with a ``token`` or ``query`` axis (the decoder's, for an encoder-decoder model) is
*streamed*: each step's positions are placed in a block of ``rows`` positions along that axis,
its keys (if any) at their absolute positions, and a block is handed to the recorder as a
:class:`~layerscope.core.region.Region` of the pass once the steps have moved past it. Memory
holds one block per variable, whatever the number of new tokens: the block is also the chunk
length along that axis, so every piece fills whole chunks.

Any other variable is *held* until ``generate()`` returns: one on no position axis (the
encoder's pass, or values on the encoder's positions only), kept once and compared with each
later step's; one on key positions only, kept step by step and assembled then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerscope.core import Recorder
from layerscope.core.errors import CaptureError
from layerscope.core.growth import fill_value_for
from layerscope.core.region import Region

from ._torch_generate_assembly import Assembled, Part, assemble, filled_note

_QUERY_ROLES = ("token", "query")
_KEY_ROLE = "key"
#: positions per block (and chunk) along the streamed axis, at most; fewer where one position's
#: values are large (a long attention row), so that a block stays within BLOCK_BYTES: the
#: blocks of every variable are what memory holds while generating, and attention rows grow
#: with the sequence
MAX_ROWS = 16
BLOCK_BYTES = 256 << 10


@dataclass(frozen=True)
class Origin:
    """Where a variable comes from and how it is labeled."""

    site: str
    kind: str
    call: int  # the site's call within a step
    roles: tuple[str, ...]
    module_type: str
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Geometry:
    """The position axes of a variable (indices into its roles)."""

    queries: tuple[int, ...]
    keys: tuple[int, ...]

    @classmethod
    def of(cls, roles: tuple[str, ...], prefix: str) -> Geometry:
        queries = tuple(i for i, role in enumerate(roles)
                        if role in tuple(prefix + r for r in _QUERY_ROLES))
        keys = tuple(i for i, role in enumerate(roles) if role == prefix + _KEY_ROLE)
        return cls(queries, keys)

    @property
    def positional(self) -> tuple[int, ...]:
        return tuple(sorted(self.queries + self.keys))


def block_rows(row_bytes: int, length: int) -> int:
    """Positions per block of a variable whose one position (all samples) takes ``row_bytes``,
    on an axis of ``length``: at most MAX_ROWS, a power of two within BLOCK_BYTES."""
    fit = max(1, BLOCK_BYTES // max(1, row_bytes))
    return min(MAX_ROWS, 1 << (fit.bit_length() - 1), length)


def key_range(count: int, end: int, length: int) -> tuple[int, int]:
    """``[start, stop)``: the positions of a key axis of ``count`` keys a step that ends at
    ``end`` had: the last ``count`` positions up to ``end`` (a sliding window keeps the last
    keys), or ``[0, count)`` where ``count`` exceeds ``end`` (a static cache, preallocated);
    cut at ``length``. The step's first ``stop - start`` keys go there."""
    start = 0 if count > end else end - count
    return start, max(start, min(start + count, length))


class StreamedVariable:
    """A variable with one ``token``/``query`` axis, written block by block."""

    def __init__(self, origin: Origin, geometry: Geometry, first: np.ndarray,
                 length: int) -> None:
        self.origin = origin
        self.axis = geometry.queries[0]
        self.keys = geometry.keys
        self.length = length
        self.other = tuple(n for i, n in enumerate(first.shape) if i not in geometry.positional)
        shape = list(first.shape)
        for axis in geometry.positional:
            shape[axis] = length
        self.shape = tuple(shape)  # batch first
        self.dtype = first.dtype
        self.fill = np.nan if np.issubdtype(first.dtype, np.floating) else \
            fill_value_for(first.dtype)
        row = int(np.prod(shape, dtype=np.int64)) // length  # one position's values
        row_bytes = first.dtype.itemsize * row
        self.rows = block_rows(row_bytes, length)
        self.covered = np.zeros(length, dtype=bool)
        self._buffer: np.ndarray | None = None  # the block's memory, made once and reused
        #: a step's value, copied out of the model (:meth:`stage`); room for a row of every key
        self._staging = np.empty(row, self.dtype)
        self.block_bytes = self.rows * row_bytes
        self.block: np.ndarray | None = None  # the open block: the buffer, or its start
        self.block_index = -1
        self.written = False

    def add(self, recorder: Recorder, value: np.ndarray, end: int) -> None:
        """One step's value, of a step whose fed tokens end at ``end``."""
        if len(value.shape) != len(self.shape) or tuple(
                n for i, n in enumerate(value.shape)
                if i != self.axis and i not in self.keys) != self.other:
            raise CaptureError(
                f"{self.origin.site}@{self.origin.kind}: its shape changes between generate() "
                f"steps beyond the token axes ({value.shape}); leave it out of the capture "
                "(exclude=...) to trace generate()")
        count = value.shape[self.axis]
        if count > end:
            raise CaptureError(
                f"{self.origin.site}@{self.origin.kind}: {count} positions on its "
                f"{self.origin.roles[self.axis]} axis, more than the {end} tokens fed so far in "
                "generate()")
        first = end - count
        for position in range(first, min(end, self.length)):
            index = position // self.rows
            if index != self.block_index:
                self._flush(recorder)
                for skipped in range(self.block_index + 1, index):  # no position of theirs
                    self._open(skipped)  # computed: written as fill, as chunks must be
                    self._flush(recorder)
                self._open(index)
            self._place(value, position - first, position % self.rows, end)
            self.covered[position] = True

    def stage(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Memory for one step's value, the same memory step after step (:meth:`add` has
        placed a value before the next step's comes). A fresh array a step, a little longer
        each step as the keys grow, would be freed in between the model's own growing
        buffers (its key/value cache) and leave the heap fragmented, a few KB a step."""
        count = int(np.prod(shape, dtype=np.int64))
        if self._staging.dtype != dtype or self._staging.size < count:  # a prompt's rows
            self._staging = np.empty(max(count, self._staging.size), dtype)
        return self._staging[:count].reshape(shape)

    def _place(self, value: np.ndarray, source: int, target: int, end: int) -> None:
        """Row ``source`` of a step's value as row ``target`` of the open block, its keys at
        their positions (0 for keys it had none for: a later position, or one a sliding
        window dropped, cannot be attended). Straight into the block: no array of the row's
        full length is made for it."""
        assert self.block is not None
        into: list[slice] = [slice(None)] * value.ndim
        taken: list[slice] = [slice(None)] * value.ndim
        into[self.axis] = slice(target, target + 1)
        taken[self.axis] = slice(source, source + 1)
        if self.keys:
            self.block[tuple(into)] = 0
            for axis in self.keys:
                start, stop = key_range(value.shape[axis], end, self.length)
                into[axis], taken[axis] = slice(start, stop), slice(0, stop - start)
        self.block[tuple(into)] = value[tuple(taken)]

    def _open(self, index: int) -> None:
        if self._buffer is None:
            shape = list(self.shape)
            shape[self.axis] = self.rows
            self._buffer = np.empty(shape, dtype=self.dtype)
        cut = [slice(None)] * len(self.shape)
        cut[self.axis] = slice(0, min(self.rows, self.length - index * self.rows))
        self.block = self._buffer[tuple(cut)]
        self.block.fill(self.fill)
        self.block_index = index

    def _flush(self, recorder: Recorder) -> None:
        if self.block is None:
            return
        block, self.block = self.block, None
        offset = [0] * (len(self.shape) - 1)
        offset[self.axis - 1] = self.block_index * self.rows
        origin = self.origin
        recorder.put(origin.site, origin.kind, block, origin.roles, origin.module_type,
                     snapshot=_copy_to,  # into the writer's reused memory: the block is reused
                     attrs={**origin.attrs, "generated": True},
                     region=Region(self.shape[1:], tuple(offset), self._chunks()),
                     call_index=origin.call)
        self.written = True

    def _chunks(self) -> dict[int, int]:
        """Chunks of an array the blocks create (axes past batch): a block along the
        streamed axis, keys whole (a block is then whole chunks, the sequence's length)."""
        return {self.axis - 1: self.rows, **{axis - 1: self.length for axis in self.keys}}

    def finish(self, recorder: Recorder, fed: int, prompt_length: int) -> None:
        self._flush(recorder)
        note = filled_note(self.covered, fed, prompt_length, bool(self.keys),
                           np.issubdtype(self.dtype, np.floating))
        if note and self.written:
            recorder.add_attrs(self.origin.site, self.origin.kind, self.origin.call,
                               {"filled": note})


def _copy_to(block: np.ndarray, alloc: Any) -> np.ndarray:
    copy: np.ndarray = alloc(block.shape, block.dtype)
    np.copyto(copy, block)
    return copy


@dataclass
class HeldVariable:
    """A variable kept until ``generate()`` returns: its first value (no position axis) or
    every step's (key positions only)."""

    origin: Origin
    geometry: Geometry
    parts: list[Part] = field(default_factory=list)
    unstorable: str = ""

    def add(self, value: np.ndarray, start: int, length: int) -> None:
        if self.unstorable:
            return
        if self.geometry.positional:
            self.parts.append((start, length, value, self.origin.roles))
        elif not self.parts:
            self.parts.append((start, length, value, self.origin.roles))
        elif not np.array_equal(value, self.parts[0][2], equal_nan=True):
            self.unstorable = ("one value per generate() step and no token axis to place it "
                               "on; trace a forward pass to store it")
            self.parts.clear()

    def result(self, length: int, fed: int, prompt_length: int, prefix: str) -> Assembled | str:
        if self.unstorable:
            return self.unstorable
        return assemble(self.parts, length, fed, prompt_length, prefix)
