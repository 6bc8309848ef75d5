"""Reopening a store to append to it: its variables as the last commit published them, and
the rows past that commit made fill values again before anything new is written."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ._zarr_compat import grow_rows, open_arrays, set_shape
from .chunkfile import ChunkFiles
from .chunkwrite import ChunkWriter, Entry
from .commit import array_document, published_shapes
from .growth import grow_axis, grows
from .naming import DimRegistry


def load_variables(group: Any, dims: DimRegistry, make: Callable[..., Any],
                   config: dict[str, Any]) -> dict[str, Any]:
    """The variables of the store ``group`` (name -> ``make(name, dims, trailing, attrs,
    array, document)``), their token axes at one length each."""
    members = open_arrays(group, skip=_NOT_ARRAYS)
    if not members:
        return {}  # a new store (or one holding no array)
    published = published_shapes(group)
    variables: dict[str, Any] = {}
    for name, array in members:
        names = tuple(array.metadata.dimension_names or ())
        if not names or names[0] != "batch":
            continue
        trailing = published.get(name)
        if trailing is not None and trailing != tuple(array.shape[1:]):
            # a token axis grown since the array's own zarr.json was written (at a close)
            set_shape(array, (int(array.shape[0]), *trailing))
        for dim, size in zip(names[1:], array.shape[1:], strict=True):
            dims.sizes.setdefault(dim, size)
        variables[name] = make(name, names, tuple(array.shape[1:]), dict(array.attrs),
                               array.with_config(config), array_document(array))
    # a writer that crashed before its first commit leaves arrays nobody published,
    # created at the token lengths of their time: one length per dim again, the longest
    for dim in [d for d in dims.sizes if grows(d)]:
        longest = max(var.trailing[var.dims.index(dim) - 1]
                      for var in variables.values() if dim in var.dims[1:])
        dims.sizes[dim] = longest
        grow_axis(variables.values(), dim, longest)
    return variables


#: what a store's group holds besides its arrays: its own document and layerscope's folder
_NOT_ARRAYS = frozenset({"zarr.json", "_layerscope"})


def invalidate_uncommitted(variables: dict[str, Any], files: ChunkFiles | None,
                           committed: int, durable: bool) -> list[Entry]:
    """Make rows past the committed length read as fill values again before anything is
    appended: a writer that crashed mid-batch may have left chunks of them, which a
    variable the next batch skips would otherwise show. Chunks wholly past the committed
    rows are deleted; the chunk across the boundary is rewritten with fill values past it
    (by zarr: in one step, a file renamed over the old one). Returns the rewritten chunks'
    manifest entries."""
    if files is None or not variables:
        return []  # chunk files can only be listed on a local disk
    entries: list[Entry] = []
    for var in variables.values():
        array = var.array
        folder = os.path.join(files.root, var.name)
        if array is None or not os.path.isdir(folder):
            continue
        chunks = tuple(int(n) for n in array.metadata.chunk_grid.chunk_shape)
        rows = chunks[0]
        grid = [-(-int(n) // c) for n, c in zip(array.shape[1:], chunks[1:], strict=True)]
        boundary = False
        for entry in os.scandir(folder):
            parts = entry.name.split(".")
            if parts[0] != "c" or len(parts) < 2 or not all(p.isdigit() for p in parts[1:]):
                continue
            first = int(parts[1]) * rows
            # past a token axis's committed length: written by a batch that grew it and
            # never committed (committed rows there read as fill values)
            beyond = any(int(p) >= n for p, n in zip(parts[2:], grid, strict=False))
            if first >= committed or beyond:
                os.unlink(entry.path)
            elif first + rows > committed:
                boundary = True
        if boundary:
            start = committed // rows * rows
            if array.shape[0] < start + rows:
                grow_rows(array, start + rows)
            kept = array[start:committed]
            merged = np.full((rows, *array.shape[1:]), array.fill_value, dtype=kept.dtype)
            merged[: committed - start] = kept
            array[start:start + rows] = merged
            writer = ChunkWriter(array, files)
            for key in writer.keys(start, start + rows):
                found = writer.read_back(key, durable)
                if found is not None:
                    entries.append(found)
    return entries
