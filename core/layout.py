"""The layout of one array (chunk grid, chunk file names, codecs) from its metadata entry.

Apart from :mod:`.chunkcheck` (which checks chunk bytes with numpy and crc32c) so that a
root document is checked without importing either: ``layerscope info`` reads only metadata.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

#: zarr v3's numeric data types, each numpy's name for itself: their item sizes without numpy
CORE_DTYPES = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "float16": 2, "float32": 4, "float64": 8, "complex64": 8,
    "complex128": 16,
}


def dtype_name(data_type: str) -> str:
    """numpy's name of a zarr data type name (numpy's ``TypeError`` where it has none)."""
    return data_type if data_type in CORE_DTYPES else str(_numpy_dtype(data_type))


def itemsize(data_type: str) -> int:
    """Bytes per element of a zarr data type name (numpy's ``TypeError`` where it has none)."""
    size = CORE_DTYPES.get(data_type)
    return size if size is not None else int(_numpy_dtype(data_type).itemsize)


@functools.lru_cache(maxsize=64)
def _numpy_dtype(data_type: str) -> Any:
    import numpy as np  # only for a data type outside zarr's core ones

    return np.dtype(data_type)


@dataclass(frozen=True)
class ArrayLayout:
    """The chunk grid and codecs of one array, as the consolidated metadata states them."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    separator: str
    checksum: bool  # the last codec is crc32c
    body: str  # "raw": bytes codec only; "blosc": bytes then blosc; "other"
    decoded_nbytes: int | None  # bytes of one decoded chunk (None: variable-length dtype)
    batch_axis: bool  # the first dim is ``batch``
    #: a batch may have been in flight when the writer stopped (status not ``complete``)
    open_ended: bool = True

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True))

    def chunk_file(self, index: tuple[int, ...]) -> str:
        return self.separator.join(["c", *(str(i) for i in index)])

    def chunk_index(self, file: str) -> tuple[int, ...] | None:
        """The grid index of a chunk file name, or None when it is not one of this array's."""
        parts = file.split(self.separator)
        if parts[0] != "c" or len(parts) != len(self.chunks) + 1:
            return None
        try:
            index = tuple(int(p) for p in parts[1:])
        except ValueError:
            return None
        if any(i < 0 or i >= n for i, n in zip(index, self.grid, strict=True)):
            return None
        return index


def layout_of(name: str, doc: dict[str, Any], open_ended: bool = True) -> ArrayLayout:
    """The layout of a checked consolidated-metadata entry (see :mod:`.validate`)."""
    codecs = [str(c.get("name")) for c in doc["codecs"]]
    checksum = bool(codecs) and codecs[-1] == "crc32c"
    inner = codecs[:-1] if checksum else codecs
    body = {("bytes",): "raw", ("bytes", "blosc"): "blosc"}.get(tuple(inner), "other")
    chunks = tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
    size = _chunk_itemsize(doc["data_type"]) if isinstance(doc["data_type"], str) else 0
    decoded = math.prod(chunks) * size if size else None
    separator = doc["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    names = doc.get("dimension_names") or []
    return ArrayLayout(name, tuple(doc["shape"]), chunks, str(separator), checksum, body,
                       decoded, bool(names) and names[0] == "batch", open_ended)


def _chunk_itemsize(data_type: str) -> int:
    try:
        return itemsize(data_type)
    except TypeError:
        return 0
