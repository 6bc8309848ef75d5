"""Writing whole chunks in the calling thread, with the array's own codecs.

An appended batch usually covers whole chunks (chunks hold as many samples as one batch). For
those, encoding chunk by chunk here, with the same zarr codec objects the array's metadata
names, produces exactly the bytes ``array[...] = data`` would, but keeps the compression on the
writer's own thread (whose priority ``StoreOptions.writer_nice`` can lower) instead of zarr's
shared pool, and skips zarr's general read-modify-write machinery. Anything else falls back
to ``array[...] = data``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


class ChunkWriter:
    def __init__(self, array: Any) -> None:
        from zarr.core.buffer import default_buffer_prototype

        self.array = array
        metadata = array.metadata
        self.chunks: tuple[int, ...] = tuple(metadata.chunk_grid.chunk_shape)
        self.codecs = list(metadata.codecs)
        self.prototype = default_buffer_prototype()
        self.spec = metadata.get_chunk_spec((0,) * len(self.chunks), array._async_array._config,
                                            self.prototype)
        self.prefix = f"{array.path}/" if array.path else ""
        self.encode_key = metadata.encode_chunk_key

    def covers(self, start: int, data: np.ndarray) -> bool:
        """Whether ``data`` written at row ``start`` fills whole chunks only."""
        rows = data.shape[0]
        if start % self.chunks[0] or rows % self.chunks[0]:
            return False
        return all(size % chunk == 0 for size, chunk in zip(data.shape[1:], self.chunks[1:],
                                                               strict=True))

    def write(self, start: int, data: np.ndarray) -> None:
        from zarr.core.sync import sync

        first = start // self.chunks[0]
        counts = [size // chunk for size, chunk in zip(data.shape, self.chunks, strict=True)]
        for index in itertools.product(*(range(n) for n in counts)):
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, self.chunks,
                                                                      strict=True))
            encoded = self._encode(np.ascontiguousarray(data[region]))
            key = self.prefix + self.encode_key((first + index[0], *index[1:]))
            sync(self.array.store.set(key, encoded))

    def _encode(self, chunk: np.ndarray) -> Any:
        value: Any = self.prototype.nd_buffer.from_numpy_array(chunk)
        for codec in self.codecs:
            value = codec._encode_sync(value, self.spec)
        return value
