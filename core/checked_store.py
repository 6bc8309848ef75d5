"""A read-only store wrapper that checks every chunk before zarr decodes it.

:func:`layerscope.open_trace` reads through :class:`CheckedStore`: each chunk's trailing
crc32c, its size against the array's metadata and, where the store has one, the per-chunk
manifest written at commit (size and crc32c of the file as written) are checked as the chunk is
fetched. A damaged, truncated, missing or swapped chunk raises :class:`ChunkError` naming the
variable and the chunk key, never decodes into wrong values or reads as fill values. The
manifest is loaded once, on the first chunk read, so opening a trace still reads no array data.
Chunks larger than :data:`OFFLOAD_BYTES` are checksummed on a thread (crc32c lets go of the
GIL), so checks of concurrent reads run in parallel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype
from zarr.storage import WrapperStore

from .chunkcheck import ArrayLayout, chunk_problem, document_problem, index_rows
from .errors import ChunkError, DamagedStoreError
from .manifest import MANIFEST_DIR, Manifest, manifest_key, parse_manifest

OFFLOAD_BYTES = 1 << 20
#: manifest files fetched at once while loading
MANIFEST_FETCHES = 64


async def fetch_manifest(store: Any, committed_batches: int) -> Manifest:
    """The manifest of the first ``committed_batches`` batches of ``store`` (any zarr store),
    its files fetched concurrently and merged by :func:`.manifest.parse_manifest`.

    A store without manifest files costs one read and one listing."""
    prototype = default_buffer_prototype()
    if not committed_batches:
        return parse_manifest([])
    last = await store.get(manifest_key(committed_batches - 1), prototype)
    if last is None and not await _any_manifest(store):
        return parse_manifest([None] * committed_batches)
    documents: list[bytes | None] = []
    for start in range(0, committed_batches - 1, MANIFEST_FETCHES):
        batch = range(start, min(start + MANIFEST_FETCHES, committed_batches - 1))
        buffers = await asyncio.gather(*(store.get(manifest_key(n), prototype) for n in batch))
        documents.extend(None if b is None else b.to_bytes() for b in buffers)
    documents.append(None if last is None else last.to_bytes())
    return parse_manifest(documents)


async def _any_manifest(store: Any) -> bool:
    if not store.supports_listing:
        return True  # read them all to know
    async for _ in store.list_prefix(f"{MANIFEST_DIR}/"):
        return True
    return False


class CheckedStore(WrapperStore[Any]):
    """Wraps a trace's store for reading; checks chunks of the arrays in ``layouts``.

    ``where``: the trace's path for messages. ``documents``: each array's consolidated
    metadata, compared with the array's own ``zarr.json`` on its first chunk read (a damaged
    root that still parses then cannot pass a wrong shape or codec off as the array's).
    ``committed_batches``: the batches whose manifests count. ``live``: a writer may still be
    committing (status ``writing``); a mismatch then reloads the manifest once before it is
    reported.
    """

    def __init__(self, store: Any, where: str = "", layouts: dict[str, ArrayLayout] | None = None,
                 documents: dict[str, dict[str, Any]] | None = None,
                 committed_batches: int = 0, live: bool = False) -> None:
        super().__init__(store)
        self.where = where
        self.layouts = dict(layouts or {})
        self.documents = dict(documents or {})
        self._agreed: set[str] = set()  # arrays whose own zarr.json was compared
        self.committed_batches = committed_batches
        self.live = live
        self._manifest: Manifest | None = None
        self._loading: asyncio.Future[Manifest] | None = None

    def _with_store(self, store: Any) -> CheckedStore:
        clone = type(self)(store, self.where, self.layouts, self.documents,
                           self.committed_batches, self.live)
        clone._manifest, clone._agreed = self._manifest, self._agreed
        return clone

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_manifest"] = None  # loaded again where it is used (a worker process)
        state["_loading"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"CheckedStore({self._store!r})"

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        """What names this store's data for dask: the wrapped store, the committed batches
        and every array's shape (dask would otherwise pickle the whole wrapper, layouts and
        documents of thousands of arrays included, to find one)."""
        shapes = hashlib.blake2b(repr(sorted((name, layout.shape) for name, layout
                                             in self.layouts.items())).encode()).hexdigest()
        return ("layerscope.CheckedStore", repr(self._store), self.where, self.committed_batches,
                self.live, shapes)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str, prototype: Any, byte_range: ByteRequest | None = None) -> Any:
        # variable names hold no "/": what follows the first one is the chunk file, whatever
        # separator the metadata claims (a damaged "/" must not hide a chunk as fill values)
        name, _, file = key.partition("/")
        layout = self.layouts.get(name)
        if layout is None or file == "zarr.json":
            return await self._store.get(key, prototype, byte_range)
        if name not in self._agreed:
            await self._compare_document(name, prototype)
        buffer = await self._store.get(key, prototype)
        await self._check(layout, file, buffer)
        if buffer is None or byte_range is None:
            return buffer
        return _slice(buffer, byte_range)

    async def get_partial_values(
        self, prototype: Any, key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Any]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range)
                                           for key, byte_range in key_ranges)))

    async def _check(self, layout: ArrayLayout, file: str, buffer: Any) -> None:
        data = None if buffer is None else np.asarray(buffer.as_numpy_array()).view(np.uint8)
        manifest = await self.manifest()
        problem = await _run(chunk_problem, layout, data, file, manifest,
                             offload=data is not None and data.nbytes > OFFLOAD_BYTES)
        if problem is not None and self.live and await self._reload():
            problem = await _run(chunk_problem, layout, data, file, await self.manifest(),
                                 offload=data is not None and data.nbytes > OFFLOAD_BYTES)
        if problem is not None:
            raise chunk_error(self.where, layout.name, file, problem)

    async def _compare_document(self, name: str, prototype: Any) -> None:
        own = await self._store.get(f"{name}/zarr.json", prototype)
        consolidated = self.documents.get(name)
        problem = None if own is None or consolidated is None \
            else document_problem(own.to_bytes(), consolidated)
        if problem is not None:
            raise DamagedStoreError(
                f"{self.where}: array {name} {problem}; one of them is damaged, so its values "
                f"cannot be trusted. Run `layerscope verify {self.where}`"
            )
        self._agreed.add(name)

    async def manifest(self) -> Manifest | None:
        """The store's manifest (None for a store written before manifests), loaded once."""
        if self._manifest is not None:
            return self._manifest if self._manifest.present else None
        loading = self._loading
        if loading is None or loading.get_loop() is not asyncio.get_running_loop():
            loading = self._loading = asyncio.ensure_future(self._load())
        manifest = await loading
        return manifest if manifest.present else None

    async def _load(self) -> Manifest:
        manifest = await fetch_manifest(self._store, self.committed_batches)
        if manifest.present:
            manifest.raise_if_damaged(self.where)
            index_rows(manifest, self.layouts, self.where)
        self._manifest = manifest
        return manifest

    async def _reload(self) -> bool:
        """Take the manifests of batches committed since the store was opened; False when
        there are none."""
        raw = await self._store.get("zarr.json", default_buffer_prototype())
        try:
            count = json.loads(raw.to_bytes())["attributes"]["committed_batches"]
        except (AttributeError, ValueError, KeyError, TypeError):
            return False
        if not isinstance(count, int) or count <= self.committed_batches:
            return False
        self.committed_batches = count
        self._manifest, self._loading = None, None
        return True


def chunk_error(where: str, variable: str, file: str, problem: str) -> ChunkError:
    key = f"{variable}/{file}"
    return ChunkError(
        f"{where}: chunk {key} of variable {variable} {problem}; its values cannot be trusted. "
        f"Run `layerscope verify {where}` to list every damaged chunk, and capture again or "
        "restore the store from a copy",
        variable, key,
    )


async def _run(check: Callable[..., str | None], *args: Any, offload: bool) -> str | None:
    if not offload:
        return check(*args)
    future: Awaitable[str | None] = asyncio.to_thread(check, *args)
    return await future


def _slice(buffer: Any, byte_range: ByteRequest) -> Any:
    size = len(buffer)
    if isinstance(byte_range, RangeByteRequest):
        return buffer[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return buffer[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return buffer[max(0, size - byte_range.suffix):]
    raise DamagedStoreError(f"unknown byte range {byte_range!r}")
