"""What a :class:`.writer.TraceWriter` keeps about each variable, batch and queued write."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chunkwrite import ChunkWriter
from .gather import Chunk, FlushGroup, VarGather
from .region import Region

ToNumpy = Callable[[Any], np.ndarray]
#: (host shape, numpy dtype) -> an empty array in memory the writer owns and reuses
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]
#: copies a framework tensor out of the model, into ``alloc``'s memory where it can
Snapshot = Callable[[Any, Alloc], Any]


def as_numpy(value: Any) -> np.ndarray:
    return np.asarray(value)


@dataclass
class Variable:
    """A variable of the store as this writer knows it."""

    name: str
    dims: tuple[str, ...]
    trailing: tuple[int, ...]
    attrs: dict[str, Any]
    array: Any = None  # the zarr array once created
    document: dict[str, Any] | None = None  # its consolidated metadata, made once
    chunk_writer: ChunkWriter | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    gather: VarGather | None = None  # its chunks span several batches (see .gather)
    settled: bool = False  # whether this writer decided if it is gathered
    #: whether each of its axes but the batch may change length between passes (.direct)
    growing: tuple[bool, ...] | None = None


@dataclass
class Batch:
    """One forward pass's rows, from ``begin_batch`` until committed."""

    number: int
    start: int
    size: int
    pending: int = 0  # tasks queued and not yet done
    writing: int = 0  # tasks a worker is writing now (counted by workers only)
    ended: bool = False
    failed: bool = False
    wrote: bool = False  # a worker started writing for it
    pieces: bool = False  # it had pieces of variables (.region): positions a later batch skips
    nbytes: int = 0
    #: the token axes' stored lengths once this batch has been put (published at its commit)
    lengths: dict[str, int] = field(default_factory=dict)
    #: chunk files written for this batch: key -> (file size, crc32c), for its manifest
    chunks: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: the rows of a chunk the last direct claim of this batch took, relative to the chunk's
    #: start (core/direct.py): one tuple for the thousands of chunks a model traced at every
    #: module claims rows of, not one each (each that lives on sets off the collector)
    claimed: tuple[int, int] = (-1, -1)


@dataclass
class Task:
    """A write queued for the writer's threads."""

    batch: Batch
    var: Variable
    data: Any
    to_numpy: ToNumpy
    nbytes: int
    buffer: np.ndarray | None = None  # the pool memory ``data`` lives in
    #: the variable's stored shape per sample when this was put: what its batch fills
    #: (token axes grown by later passes are theirs: they commit with them)
    shape: tuple[int, ...] = ()
    region: Region | None = None  # where a piece of the batch's rows goes (.region)
    #: a gathered variable's rows: the chunk pieces they fill in memory (see .gather)
    parts: list[tuple[Chunk, int, int]] | None = None
    #: a gathered chunk written whole, at row ``chunk.start``, for its flush group
    chunk: Chunk | None = None
    group: FlushGroup | None = None
