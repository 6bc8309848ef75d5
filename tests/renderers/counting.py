"""A Zarr store wrapper that counts the keys and bytes read through it."""

from __future__ import annotations

import collections
from typing import Any

from zarr.storage import WrapperStore


class CountingStore(WrapperStore):
    """Delegates to a wrapped store; records every key read and the bytes returned."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.reads: collections.Counter[str] = collections.Counter()
        self.nbytes: collections.Counter[str] = collections.Counter()

    def _with_store(self, store: Any) -> CountingStore:
        clone = type(self)(store)
        clone.reads, clone.nbytes = self.reads, self.nbytes  # one tally for every view
        return clone

    def reset(self) -> None:
        self.reads.clear()
        self.nbytes.clear()

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buffer = await self._store.get(key, prototype, byte_range)
        self.reads[key] += 1
        if buffer is not None:
            self.nbytes[key] += len(buffer)
        return buffer

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        key_ranges = list(key_ranges)
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buffer in zip(key_ranges, buffers, strict=True):
            self.reads[key] += 1
            if buffer is not None:
                self.nbytes[key] += len(buffer)
        return buffers

    def chunk_reads(self) -> dict[str, set[tuple[int, ...]]]:
        """Chunk coordinates read, per array (metadata documents left out)."""
        out: dict[str, set[tuple[int, ...]]] = collections.defaultdict(set)
        for key in self.reads:
            coords = chunk_coords(key)
            if coords is not None:
                out[key.rpartition("/")[0]].add(coords)
        return dict(out)


def chunk_coords(key: str) -> tuple[int, ...] | None:
    """(i, j, ...) of a chunk key ``<array>/c.i.j...`` (layerscope's "." separator)."""
    name = key.rpartition("/")[2]
    if not name.startswith("c."):
        return None
    return tuple(int(c) for c in name.split(".")[1:])
