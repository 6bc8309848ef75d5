"""Checking a trace's root ``zarr.json`` before anything is built from it.

Every open reads the root document: group attributes plus the consolidated metadata of every
array. Here it is parsed by hand and checked (types, counts, shapes against the committed rows,
chunk grids, codecs) so that a damaged document is one :class:`DamagedStoreError` or
:class:`SchemaError` naming the path and the defect, never a traceback from zarr or xarray, and
so that no shape is trusted before the chunk files it claims are seen on disk: a shape sized
10^8 rows in a store that holds ten is refused before dask builds a graph of that size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DamagedStoreError, SchemaError, StoreError
from .layout import ArrayLayout, layout_of
from .schema import (
    BATCH,
    SCHEMA_VERSION,
    STATUS_ABORTED,
    STATUS_COMPLETE,
    STATUS_REPLACING,
    STATUS_WRITING,
)

STATUSES = (STATUS_WRITING, STATUS_COMPLETE, STATUS_ABORTED)
#: codecs a trace may name; never a pickle or object codec
CODECS = frozenset({"bytes", "crc32c", "blosc", "zstd", "gzip", "transpose", "vlen-utf8",
                    "vlen-bytes"})
#: attributes whose type is fixed when present (stores of older versions may lack them)
ATTR_TYPES: dict[str, type | tuple[type, ...]] = {
    "layerscope_version": str, "framework": str, "framework_version": str, "created": str,
    "model": dict, "capture": dict, "skipped": dict,
}
#: chunk positions of one array past which the claimed grid is compared with the files present
LISTING_THRESHOLD = 4096
MAX_DIM = 1 << 48


@dataclass(frozen=True)
class RootDocument:
    """A checked root document: the group attributes and each array's layout."""

    attrs: dict[str, Any]
    layouts: dict[str, ArrayLayout]
    documents: dict[str, dict[str, Any]]  # array name -> its consolidated metadata


@dataclass(frozen=True)
class LocalFolder:
    """A trace in a local folder, read with plain file calls: checking its root document
    imports neither zarr nor an event loop (``layerscope info`` starts fast)."""

    root: str


def local_folder(path: str) -> LocalFolder:
    """The trace folder at ``path``; a path that is missing or a file is a :class:`StoreError`."""
    if not os.path.exists(path):
        raise StoreError(f"no trace at {path}: the path does not exist")
    if not os.path.isdir(path):
        raise StoreError(f"{path} is a file, not a trace store (a folder holding zarr.json)")
    return LocalFolder(path)


def _local_root(store: Any) -> str | None:
    """The folder of a local store (a :class:`LocalFolder` or zarr's ``LocalStore``)."""
    root = getattr(store, "root", None)
    return os.fspath(root) if isinstance(root, (str, os.PathLike)) else None


def run_sync(coroutine: Any) -> Any:
    """Run a store coroutine to its end from synchronous code (on zarr's loop where it can)."""
    from ._zarr_compat import _private_sync, _run_on_own_loop

    sync = _private_sync()
    return sync(coroutine) if sync is not None else _run_on_own_loop(coroutine)


def damaged(where: str, defect: str) -> DamagedStoreError:
    return DamagedStoreError(
        f"{where}: {defect}; the store's metadata is damaged: capture again or restore the "
        "store from a copy"
    )


def being_replaced(where: str) -> StoreError:
    """The error for a tombstone: the root document (status ``replacing``) that mode='w'
    writes before it deletes a store's old contents, and that a new store's replaces."""
    return StoreError(
        f"{where} holds no trace: it was being replaced (or created) when its writer stopped; "
        "write it again with mode='w' (CLI: --overwrite), which replaces it"
    )


def read_root(store: Any, where: str) -> RootDocument:
    """Read and check the root document of the trace in ``store`` (any zarr store, or a
    :class:`LocalFolder`)."""
    raw = _read_local(store.root) if isinstance(store, LocalFolder) else _read_store(store)
    if raw is None:
        raise StoreError(f"{where} has no zarr.json: it is not a Zarr v3 group; is it a "
                         "layerscope trace?")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(where, f"its zarr.json is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise damaged(where, f"its zarr.json holds {type(doc).__name__}, not a JSON object")
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise StoreError(f"{where} is not a Zarr v3 group (zarr_format {doc.get('zarr_format')!r},"
                         f" node_type {doc.get('node_type')!r}); is it a layerscope trace?")
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, dict):
        raise damaged(where, "its group attributes are not a JSON object")
    check_attrs(attrs, where)
    layouts = check_arrays(doc, attrs, where)
    metadata = doc["consolidated_metadata"]["metadata"]
    return RootDocument(attrs, layouts, {name: metadata[name] for name in layouts})


def _read_local(folder: str) -> bytes | None:
    """The root zarr.json's bytes, None where there is none (as zarr's ``LocalStore`` reads)."""
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as file:
            return file.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _read_store(store: Any) -> bytes | None:
    from zarr.buffer import default_buffer_prototype

    raw = run_sync(store.get("zarr.json", default_buffer_prototype()))
    return None if raw is None else raw.to_bytes()


def check_attrs(attrs: dict[str, Any], where: str) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise SchemaError(f"{where} is a Zarr group but not a layerscope trace (no "
                          "schema_version)")
    if not _is_int(version) or version < 1:
        raise SchemaError(f"{where}: schema_version is {version!r}, not a positive integer; "
                          "the store is damaged or was not written by layerscope")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{where} has schema_version {version}, newer than this layerscope "
                          f"reads ({SCHEMA_VERSION}); upgrade layerscope")
    status = attrs.get("status", STATUS_WRITING)
    if status == STATUS_REPLACING:
        raise being_replaced(where)
    if status not in STATUSES:
        raise damaged(where, f"its status is {status!r}, not one of {', '.join(STATUSES)}")
    for name in ("committed_batches", "committed_samples"):
        value = attrs.get(name, 0)
        if not _is_int(value) or not 0 <= value < MAX_DIM:
            raise damaged(where, f"{name} is {value!r}, not a count")
    if attrs.get("committed_samples", 0) < attrs.get("committed_batches", 0):
        raise damaged(where, f"{attrs.get('committed_samples', 0)} committed samples cannot fill "
                      f"{attrs.get('committed_batches', 0)} committed batches")
    for name, kind in ATTR_TYPES.items():
        if name in attrs and not isinstance(attrs[name], kind):
            raise damaged(where, f"attribute {name} is {type(attrs[name]).__name__}, not "
                          f"{kind.__name__ if isinstance(kind, type) else kind}")


def check_arrays(doc: dict[str, Any], attrs: dict[str, Any], where: str) -> dict[str, ArrayLayout]:
    consolidated = doc.get("consolidated_metadata")
    if not isinstance(consolidated, dict) or not isinstance(consolidated.get("metadata"), dict):
        raise damaged(where, "its zarr.json has no consolidated metadata, which every commit "
                      "writes")
    rows = attrs.get("committed_samples", 0)
    layouts: dict[str, ArrayLayout] = {}
    for name, entry in consolidated["metadata"].items():
        if not isinstance(entry, dict):
            raise damaged(where, f"the consolidated metadata of {name!r} is not an object")
        if entry.get("node_type") != "array":
            continue  # a subgroup: layerscope writes none, zarr reads it on its own
        problem = _array_problem(entry, rows)
        if problem is not None:
            raise damaged(where, f"array {name}: {problem}")
        # a complete store had no batch in flight: its boundary chunk must match its manifest
        open_ended = attrs.get("status") != STATUS_COMPLETE
        layouts[str(name)] = layout_of(str(name), entry, open_ended)
    return layouts


def _array_problem(entry: dict[str, Any], rows: int) -> str | None:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(n) and 0 <= n < MAX_DIM for n in shape):
        return f"shape {shape!r} is not a list of sizes"
    grid = entry.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list):
        return f"chunk grid {grid!r} is not a regular grid"
    if len(chunks) != len(shape) or not all(_is_int(n) and 0 < n < MAX_DIM for n in chunks):
        return f"chunk shape {chunks!r} does not give each of the {len(shape)} dims a size > 0"
    encoding = entry.get("chunk_key_encoding")
    if not isinstance(encoding, dict) or encoding.get("name") != "default" \
            or not isinstance(encoding.get("configuration", {}), dict) \
            or encoding.get("configuration", {}).get("separator", "/") not in (".", "/"):
        return f"chunk key encoding {encoding!r} is not zarr's default with '.' or '/'"
    codecs = entry.get("codecs")
    if not isinstance(codecs, list) or not codecs \
            or not all(isinstance(c, dict) and c.get("name") in CODECS for c in codecs):
        return f"codecs {codecs!r} are not among {', '.join(sorted(CODECS))}"
    if not isinstance(entry.get("data_type"), (str, dict)):
        return f"data type {entry.get('data_type')!r} is not a name"
    names = entry.get("dimension_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(shape)
                              or not all(isinstance(n, str) for n in names)):
        return f"dimension names {names!r} do not name its {len(shape)} dims"
    if names and names[0] == BATCH and shape[0] != rows:
        return f"{shape[0]} rows along batch, but {rows} samples are committed"
    if "attributes" in entry and not isinstance(entry["attributes"], dict):
        return "its attributes are not an object"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_claims(store: Any, root: RootDocument, where: str) -> None:
    """Compare what the metadata claims with the chunk files present, before anything sized
    by a shape is built: the last committed row-chunk of the ``batch`` coordinate (every batch
    writes it) must exist, and an array with many chunk positions must have a file for each
    position of one row-chunk (trailing dims are the same in every batch). A local folder is
    read with plain file calls, any other store through its coroutines."""
    folder = _local_root(store)
    if folder is None:
        run_sync(_check_claims(store, root, where))
        return
    keys = _last_row_keys(root)
    _check_last_rows(keys, [os.path.isfile(os.path.join(folder, key)) for key in keys], root,
                     where)
    _check_named(_folders_without_files(folder, sorted(root.layouts)), where)
    for layout, trailing in _dense_layouts(root):
        _check_count(layout, trailing, _count_folder_files(folder, layout), where)


async def _check_claims(store: Any, root: RootDocument, where: str) -> None:
    import asyncio

    keys = _last_row_keys(root)
    _check_last_rows(keys, await asyncio.gather(*(store.exists(key) for key in keys)), root,
                     where)
    names = sorted(root.layouts)
    own = await asyncio.gather(*(store.exists(f"{name}/zarr.json") for name in names))
    _check_named([name for name, exists in zip(names, own, strict=True)
                  if not exists and not await _holds_any(store, f"{name}/")], where)
    for layout, trailing in _dense_layouts(root):
        _check_count(layout, trailing, await _count_files(store, layout), where)


def _last_row_keys(root: RootDocument) -> list[str]:
    """The chunk files of the last committed rows of (up to 8) arrays along ``batch``, the
    batch coordinate first: every batch writes it."""
    rows = root.attrs.get("committed_samples", 0)
    with_rows = [layout for layout in root.layouts.values() if layout.batch_axis]
    if not rows:
        return []
    with_rows.sort(key=lambda layout: layout.name != BATCH)
    return [f"{layout.name}/{_last_row_chunk(layout, rows)}" for layout in with_rows[:8]]


def _check_last_rows(keys: list[str], found: list[bool], root: RootDocument,
                     where: str) -> None:
    if keys and not any(found):
        raise damaged(where, f"{root.attrs.get('committed_samples', 0)} committed samples are "
                      f"claimed, but the chunk files of the last rows are absent ({keys[0]} and "
                      "others)")


def _check_named(without_files: list[str], where: str) -> None:
    # an array's own zarr.json may be lost (the root holds its metadata), but not the whole
    # array: a name the store does not hold is a damaged root document
    if without_files:
        raise damaged(where, f"the root zarr.json names an array {without_files[0]!r} of "
                      "which the store holds no file")


def _dense_layouts(root: RootDocument) -> list[tuple[ArrayLayout, int]]:
    """The arrays with more chunk positions per row-chunk than are checked without listing
    their files, and that number."""
    dense = []
    for layout in root.layouts.values():
        trailing = math.prod(layout.grid[1:]) if layout.batch_axis else math.prod(layout.grid)
        if trailing > LISTING_THRESHOLD:
            dense.append((layout, trailing))
    return dense


def _check_count(layout: ArrayLayout, trailing: int, present: int, where: str) -> None:
    if present < trailing:
        raise damaged(where, f"array {layout.name} claims shape {list(layout.shape)}, "
                      f"{trailing} chunks per row-chunk, but holds {present} chunk files")


def _folders_without_files(root: str, names: list[str]) -> list[str]:
    """The arrays among ``names`` of which the folder ``root`` holds no file, from one listing
    of it (thousands of arrays: one ``exists`` each would cost more than opening the trace)."""
    try:
        with os.scandir(root) as entries:
            folders = {entry.name for entry in entries if entry.is_dir(follow_symlinks=False)}
    except OSError:
        folders = set()
    return [name for name in names
            if name not in folders or not _folder_holds_any(os.path.join(root, name))]


def _folder_holds_any(folder: str) -> bool:
    if os.path.exists(os.path.join(folder, "zarr.json")):
        return True
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


async def _holds_any(store: Any, prefix: str) -> bool:
    async for _ in store.list_prefix(prefix):
        return True
    return False


def _last_row_chunk(layout: ArrayLayout, rows: int) -> str:
    return layout.chunk_file(((rows - 1) // layout.chunks[0], *(0,) * (len(layout.chunks) - 1)))


def _count_folder_files(root: str, layout: ArrayLayout) -> int:
    """How many chunk files ``layout``'s array holds in the folder ``root`` (the files under
    ``<name>/c``, as zarr's ``LocalStore`` lists them)."""
    if layout.separator == ".":
        try:
            with os.scandir(os.path.join(root, layout.name)) as entries:
                return sum(1 for entry in entries if entry.name.startswith("c."))
        except OSError:
            return 0
    return sum(1 for path in Path(root, layout.name, "c").rglob("*")
               if path.is_file() and not path.name.endswith("zarr.json"))


async def _count_files(store: Any, layout: ArrayLayout) -> int:
    count = 0
    async for key in store.list_prefix(f"{layout.name}/c"):
        count += not key.endswith("zarr.json")
    return count
