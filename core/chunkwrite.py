"""Writing whole chunks in the calling thread, with the array's own codecs.

An appended batch usually covers whole chunks (chunks hold as many samples as one batch). For
those, encoding chunk by chunk here, with the same zarr codec objects the array's metadata
names, produces exactly the bytes ``array[...] = data`` would, but keeps the compression on the
writer's own thread instead of zarr's shared pool, and skips zarr's general read-modify-write
machinery. The trailing crc32c is computed here and written after the body rather than
appended to a copy of it. On a local store the files are written directly
(:mod:`.chunkfile`); anything else goes through the store. Partial chunks fall back to
``array[...] = data``, and so does every chunk where zarr lacks an internal the encoding needs
(:mod:`._zarr_compat` holds them all).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from ._rawfile import used_bytes, zeros
from ._zarr_compat import chunk_encoder, chunk_key, chunk_setter, get_bytes
from .chunkfile import ChunkFiles
from .errors import WriterError
from .manifest import recorded_crc

#: (chunk key, file size, crc32c as the manifest records it) for the checksum manifest
Entry = tuple[str, int, int]


def local_chunk_files(store: Any, direct_io: bool, durable: bool = False) -> ChunkFiles | None:
    """The direct file writer for a local store, shared by all of a trace's arrays."""
    from zarr.storage import LocalStore

    if not isinstance(store, LocalStore):
        return None
    return ChunkFiles(Path(store.root), direct_io, durable)


class ChunkWriter:
    def __init__(self, array: Any, files: ChunkFiles | None = None) -> None:
        """``files``: where a local store's chunk files go (None: through the store).

        Where zarr lacks an internal this needs (see :mod:`._zarr_compat`), :attr:`enabled`
        is False and :meth:`covers` says no to everything: the caller writes with
        ``array[...] = data``.
        """
        self.array = array
        self.files = files
        self.encoder = chunk_encoder(array)
        self.setter = chunk_setter(array.store) if files is None else None
        self.enabled = self.encoder is not None and (files is not None or self.setter is not None)
        self.prefix = f"{array.path}/" if array.path else ""
        #: the array's last codec is crc32c: each chunk file ends in its own checksum
        self.checksum = self.encoder.checksum if self.encoder is not None \
            else _ends_in_crc32c(array)

    @property
    def raw(self) -> bool:
        """Whether chunks are stored as their own memory (no codec but the checksum)."""
        return self.encoder is not None and self.encoder.raw

    def covers(self, start: int, data: np.ndarray,
               offset: tuple[int, ...] | None = None) -> bool:
        """Whether ``data`` written at row ``start`` (and ``offset`` along the other axes:
        a piece, :mod:`.region`) fills whole chunks only (and this writer can write them).
        Along the other axes ``data`` may also end where the array ends, in a chunk that
        reaches past it (a token axis chunked with room to grow): zarr stores that edge chunk
        whole, fill values past the end, and so does :meth:`write`."""
        encoder = self.encoder
        if encoder is None or not self.enabled:
            return False
        chunks = encoder.chunks
        if start % chunks[0] or data.shape[0] % chunks[0]:
            return False
        extent = tuple(int(n) for n in self.array.shape[1:])
        first = offset if offset is not None else (0,) * len(extent)
        return all(at % chunk == 0 and (size % chunk == 0 or at + size == end)
                   for at, size, chunk, end in zip(first, data.shape[1:], chunks[1:], extent,
                                                   strict=True))

    def write(self, start: int, data: np.ndarray, entries: list[Entry] | None = None,
              offset: tuple[int, ...] | None = None, replace: bool = False,
              used: int | None = None) -> None:
        """Write ``data`` at row ``start`` (and ``offset`` along the other axes); only where
        :meth:`covers` said yes. ``entries`` gets each file's key, size and crc32c for the
        manifest (see :mod:`.manifest`: the chunk's own checksum where it has one, i.e. the
        crc32c of the body). ``replace``: the chunks may hold committed rows already, so each
        file is replaced in one step (a new file renamed over it), never rewritten in place.
        ``used``: a gathered chunk's rows a reader may see (:attr:`.gather.Chunk.used`); in a
        local file of a chunk stored as its own memory only the pages holding them are
        written, the rest is a hole (zeros, which the checksum covers)."""
        encoder = self.encoder
        if encoder is None or not self.enabled:
            raise WriterError(f"{self.array.path}: chunks cannot be written past zarr here; "
                              "write them with array[...] = data")
        chunks = encoder.chunks
        first = (start, *(offset or (0,) * (data.ndim - 1)))
        first = tuple(at // chunk for at, chunk in zip(first, chunks, strict=True))
        counts = [-(-size // chunk) for size, chunk in zip(data.shape, chunks, strict=True)]
        for index in itertools.product(*(range(n) for n in counts)):
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
            block = data[region]
            if block.shape != chunks:  # an edge chunk: whole, fill values past the end
                block = _filled(block, chunks, self.array.fill_value)
            body = encoder.encode(np.ascontiguousarray(block))
            written = self.written_bytes(body, used)  # the rest: a hole, read as zeros
            crc = _crc32c(body[:written], body.nbytes - written) \
                if encoder.checksum or entries is not None else 0
            trailer = crc.to_bytes(4, "little") if encoder.checksum else b""
            key = self.prefix + encoder.chunk_key(tuple(a + i for a, i in
                                                        zip(first, index, strict=True)))
            self._store(key, body, trailer, replace, written)
            if entries is not None:  # with a trailer or without, the body's crc32c
                entries.append((key, body.nbytes + len(trailer), crc))

    def keys(self, start: int, stop: int, trailing: tuple[int, ...] | None = None,
             offset: tuple[int, ...] | None = None) -> list[str]:
        """The keys of every chunk holding rows ``start:stop`` (what zarr writes for them),
        within ``trailing`` positions of the other axes from ``offset`` (default: all)."""
        chunks = tuple(int(n) for n in self.array.metadata.chunk_grid.chunk_shape)
        extent = trailing if trailing is not None else self.array.shape[1:]
        first = offset if offset is not None else (0,) * len(extent)
        ranges = [range(begin // chunk, (begin + int(size) - 1) // chunk + 1)
                  for begin, size, chunk in zip(first, extent, chunks[1:], strict=True)]
        rows = range(start // chunks[0], (stop - 1) // chunks[0] + 1)
        return [self.prefix + chunk_key(self.array, index)
                for index in itertools.product(rows, *ranges)]

    def read_back(self, key: str, durable: bool = False) -> Entry | None:
        """``(key, size, crc32c)`` of a chunk file as stored (the crc32c the manifest records,
        :func:`.manifest.recorded_crc`), None if there is none; ``durable``: flushed to the
        disk too (a local store's file)."""
        if self.files is not None:
            data = self.files.read(key, durable)
        else:
            data = get_bytes(self.array.store, key)
        if data is None:
            return None
        return key, len(data), recorded_crc(data, self.checksum)

    @property
    def raw_files(self) -> bool:
        """Whether chunks go to a local store's files as their own memory: what the chunk
        process writes, and where a part-used chunk's unused rows may be a hole."""
        return self.files is not None and self.raw

    def written_bytes(self, body: np.ndarray, used: int | None) -> int:
        """The bytes of a chunk's ``body`` to write where a reader sees only its first
        ``used`` rows: those rows' pages (:func:`._rawfile.used_bytes`) where
        :attr:`raw_files`, else all."""
        if used is None or not self.raw_files:
            return body.nbytes
        assert self.encoder is not None  # raw
        return used_bytes(body.nbytes, used, self.encoder.chunks[0])

    def rows_written(self, used: int, rows: int) -> int:
        """The rows of a chunk of ``rows`` whose first ``used`` alone are read that
        :meth:`write` puts on the disk (those whose bytes :meth:`written_bytes` takes): the
        others need no value."""
        if used >= rows or not self.raw_files:
            return rows
        assert self.encoder is not None  # raw
        row_bytes = math.prod(self.encoder.chunks[1:]) * self.array.dtype.itemsize
        return min(rows, -(-used_bytes(rows * row_bytes, used, rows) // row_bytes))

    def _store(self, key: str, body: np.ndarray, trailer: bytes, replace: bool,
               written: int) -> None:
        if self.files is not None:
            part, length = body[:written], body.nbytes
            if replace:
                self.files.replace(key, part, trailer, length)
            else:
                self.files.write(key, part, trailer, length)
            return
        assert self.setter is not None  # enabled
        self.setter(key, np.concatenate([body, np.frombuffer(trailer, dtype=np.uint8)]))


def _filled(block: np.ndarray, chunks: tuple[int, ...], fill: Any) -> np.ndarray:
    whole = np.full(chunks, fill, dtype=block.dtype)
    whole[tuple(slice(0, n) for n in block.shape)] = block
    return whole


def _ends_in_crc32c(array: Any) -> bool:
    from zarr.codecs import Crc32cCodec

    codecs = list(getattr(array.metadata, "codecs", ()))
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


def _crc32c(body: np.ndarray, hole: int = 0) -> int:
    """The crc32c of ``body`` followed by ``hole`` zero bytes (a hole in the file after it)."""
    # the crc32c package can let go of the GIL while it runs (google_crc32c holds it), so
    # that the model's Python thread is not kept waiting by a writer thread checksumming a
    # large chunk; below 1 MB (40 us) it holds it: taking it back would cost the model's
    # thread more (it waits for the writer's next Python after every hand-over)
    mode = 1 if body.nbytes + hole >= LET_GO_FROM else 0
    crc = crc32c.crc32c(body.data, gil_release_mode=mode)
    if hole:
        crc = crc32c.crc32c(zeros(hole), crc, gil_release_mode=mode)
    return int(crc)


LET_GO_FROM = 1 << 20  # bytes
