"""Writing whole chunks in the calling thread, with the array's own codecs.

An appended batch usually covers whole chunks (chunks hold as many samples as one batch). For
those, encoding chunk by chunk here, with the same zarr codec objects the array's metadata
names, produces exactly the bytes ``array[...] = data`` would, but keeps the compression on the
writer's own thread instead of zarr's shared pool, and skips zarr's general read-modify-write
machinery. The trailing crc32c is computed here and written after the body rather than
appended to a copy of it. On a local store the files are written directly
(:mod:`.chunkfile`); anything else goes through the store. Partial chunks fall back to
``array[...] = data``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from .chunkfile import ChunkFiles


def local_chunk_files(store: Any, direct_io: bool) -> ChunkFiles | None:
    """The direct file writer for a local store, shared by all of a trace's arrays."""
    from zarr.storage import LocalStore

    return ChunkFiles(Path(store.root), direct_io) if isinstance(store, LocalStore) else None


class ChunkWriter:
    def __init__(self, array: Any, files: ChunkFiles | None = None) -> None:
        """``files``: where a local store's chunk files go (None: through the store)."""
        from zarr.codecs import Crc32cCodec
        from zarr.core.buffer import default_buffer_prototype

        self.array = array
        metadata = array.metadata
        self.chunks: tuple[int, ...] = tuple(metadata.chunk_grid.chunk_shape)
        self.codecs = list(metadata.codecs)
        self.checksum = bool(self.codecs) and isinstance(self.codecs[-1], Crc32cCodec)
        if self.checksum:
            self.codecs.pop()
        self.prototype = default_buffer_prototype()
        self.spec = metadata.get_chunk_spec((0,) * len(self.chunks), array._async_array._config,
                                            self.prototype)
        self.raw = _raw_bytes(self.codecs)
        self.prefix = f"{array.path}/" if array.path else ""
        self.encode_key = metadata.encode_chunk_key
        self.files = files

    def covers(self, start: int, data: np.ndarray) -> bool:
        """Whether ``data`` written at row ``start`` fills whole chunks only."""
        rows = data.shape[0]
        if start % self.chunks[0] or rows % self.chunks[0]:
            return False
        return all(size % chunk == 0 for size, chunk in zip(data.shape[1:], self.chunks[1:],
                                                               strict=True))

    def write(self, start: int, data: np.ndarray) -> None:
        first = start // self.chunks[0]
        counts = [size // chunk for size, chunk in zip(data.shape, self.chunks, strict=True)]
        for index in itertools.product(*(range(n) for n in counts)):
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, self.chunks,
                                                                      strict=True))
            body = self._encode(np.ascontiguousarray(data[region]))
            trailer = _crc32c(body) if self.checksum else b""
            key = self.prefix + self.encode_key((first + index[0], *index[1:]))
            self._store(key, body, trailer)

    def _encode(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk's bytes after every codec but the checksum, as a flat uint8 array."""
        if self.raw and chunk.dtype.isnative:
            return chunk.view(np.uint8).reshape(-1)  # what the bytes codec would return
        value: Any = self.prototype.nd_buffer.from_numpy_array(chunk)
        for codec in self.codecs:
            value = codec._encode_sync(value, self.spec)
        return np.asarray(value.as_numpy_array()).view(np.uint8).reshape(-1)

    def _store(self, key: str, body: np.ndarray, trailer: bytes) -> None:
        if self.files is not None:
            self.files.write(key, body, trailer)
            return
        from zarr.core.sync import sync

        encoded = np.concatenate([body, np.frombuffer(trailer, dtype=np.uint8)])
        sync(self.array.store.set(key, self.prototype.buffer.from_array_like(encoded)))


def _raw_bytes(codecs: list[Any]) -> bool:
    """Whether ``codecs`` store a chunk as its memory: a bytes codec in this machine's order.

    Uncompressed variables take this path every chunk; skipping zarr's buffer and codec
    objects there keeps the writer thread off Python's lock, which the model's thread needs.
    """
    from zarr.codecs import BytesCodec

    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian
    return endian is None or endian.value == sys.byteorder


def _crc32c(body: np.ndarray) -> bytes:
    # the crc32c package lets go of the GIL while it runs (google_crc32c holds it), so the
    # model's Python thread is not kept waiting by a writer thread checksumming a chunk
    return int(crc32c.crc32c(body.data)).to_bytes(4, "little")
