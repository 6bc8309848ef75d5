"""Every use of zarr's private API, each behind a function that falls back to the public one.

The writer goes around zarr in three places, for speed:

- whole chunks are encoded on the writer's own thread with the array's codec objects
  (``metadata.get_chunk_spec``, ``codec._encode_sync``, ``metadata.encode_chunk_key``) and
  written as files (or through ``zarr.core.sync.sync(store.set(...))`` on other stores);
- arrays grow in memory only, by replacing the frozen metadata of the array's ``AsyncArray``,
  so that zarr's own partial-chunk writes pass its bounds check without a ``zarr.json``
  rewrite per batch;
- the root ``zarr.json`` of a non-local store is written with ``zarr.core.sync.sync``.

Each function here checks, once per array or per call (never per chunk), that what it needs
exists, and otherwise takes the public API: ``array[rows] = data`` for every write,
``Array.resize`` to grow an array (one ``zarr.json`` write per doubling) and the store's own
coroutine run on an event loop of our own. A zarr release that drops an internal therefore
costs speed, not correctness. No other module of layerscope touches zarr's internals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

#: False: take the public fallback everywhere, as a zarr without these internals would.
#: Tests switch it off to check that the fallback stores the same values.
PRIVATE_API = True

#: Writes ``(key, bytes as a flat uint8 array)`` to one store.
Setter = Callable[[str, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class ChunkEncoder:
    """Encodes whole chunks of one array exactly as zarr would, without zarr's pipeline.

    ``checksum``: the array's last codec is crc32c, left out of :meth:`encode` for the caller
    to compute and append. ``raw``: the other codecs are only a bytes codec in this machine's
    byte order, so a native chunk is stored as its own memory.
    """

    chunks: tuple[int, ...]
    checksum: bool
    raw: bool
    encoders: tuple[Callable[[Any, Any], Any], ...]
    spec: Any
    prototype: Any
    chunk_key: Callable[[tuple[int, ...]], str]

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk's bytes after every codec but the checksum, as a flat uint8 array."""
        if self.raw and chunk.dtype.isnative:
            return chunk.view(np.uint8).reshape(-1)  # what the bytes codec would return
        value = self.prototype.nd_buffer.from_numpy_array(chunk)
        for encode in self.encoders:
            value = encode(value, self.spec)
        return np.asarray(value.as_numpy_array()).view(np.uint8).reshape(-1)


def chunk_encoder(array: Any) -> ChunkEncoder | None:
    """An encoder for ``array``'s whole chunks, or None: write them with ``array[...] = data``.

    None where this zarr lacks an internal the encoder needs, or where one of the array's
    codecs cannot encode synchronously (sharding, numcodecs wrappers). Arrays made from one
    template (:func:`create_array`) share their metadata's parts, and so one encoder.
    """
    if not PRIVATE_API:
        return None
    metadata = array.metadata
    parts = tuple(getattr(metadata, name, None) for name in _ENCODER_PARTS) + (array.config,)
    kept = _ENCODERS.get(tuple(map(id, parts)))
    if kept is not None and all(a is b for a, b in zip(kept[0], parts, strict=True)):
        return kept[1]
    encoder = _chunk_encoder(array)
    if len(_ENCODERS) > _MEMO_SIZE:
        _ENCODERS.clear()
    _ENCODERS[tuple(map(id, parts))] = (parts, encoder)  # the parts kept: their ids stay theirs
    return encoder


#: what an encoder is made of; arrays whose metadata shares these objects share it
_ENCODER_PARTS = ("chunk_grid", "codecs", "data_type", "fill_value", "chunk_key_encoding")
_ENCODERS: dict[tuple[int, ...], tuple[tuple[Any, ...], ChunkEncoder | None]] = {}
_MEMO_SIZE = 4096


def _chunk_encoder(array: Any) -> ChunkEncoder | None:
    from zarr.buffer import default_buffer_prototype
    from zarr.codecs import Crc32cCodec

    metadata = array.metadata
    try:
        chunks = tuple(int(n) for n in metadata.chunk_grid.chunk_shape)
        codecs = list(metadata.codecs)
        checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
        if checksum:
            codecs.pop()
        prototype = default_buffer_prototype()
        spec = metadata.get_chunk_spec((0,) * len(chunks), array.config, prototype)
        encoders = tuple(codec._encode_sync for codec in codecs)
        chunk_key = metadata.encode_chunk_key
    except (AttributeError, TypeError):
        return None
    return ChunkEncoder(chunks, checksum, _raw_bytes(codecs), encoders, spec, prototype,
                        chunk_key)


def chunk_key(array: Any, index: tuple[int, ...]) -> str:
    """The key (below the array) of ``array``'s chunk ``index``; zarr's own encoder where it
    has one, else the v3 default encoding the array's metadata names."""
    metadata = array.metadata
    encode = getattr(metadata, "encode_chunk_key", None)
    if encode is not None:
        return str(encode(index))
    separator = metadata.chunk_key_encoding.separator
    return separator.join(["c", *(str(i) for i in index)])


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


def chunk_setter(store: Any) -> Setter | None:
    """A fast synchronous write of chunk bytes to ``store``; None without zarr's private
    ``sync`` (chunks are then written with ``array[...] = data``)."""
    sync = _private_sync()
    if sync is None:
        return None
    from zarr.buffer import default_buffer_prototype

    buffer = default_buffer_prototype().buffer

    def put(key: str, data: np.ndarray) -> None:
        sync(store.set(key, buffer.from_array_like(data)))

    return put


def set_bytes(store: Any, key: str, data: bytes) -> None:
    """Write ``data`` as ``key`` of ``store`` (any zarr store), in one ``store.set``."""
    from zarr.buffer import default_buffer_prototype

    value = default_buffer_prototype().buffer.from_bytes(data)
    sync = _private_sync()
    if sync is not None:
        sync(store.set(key, value))  # on zarr's own event loop, like its synchronous API
    else:
        _run_on_own_loop(store.set(key, value))


def set_many(store: Any, items: dict[str, bytes]) -> None:
    """Write every ``key: data`` of ``items`` to ``store`` concurrently (one event-loop run)."""
    from zarr.buffer import default_buffer_prototype

    buffer = default_buffer_prototype().buffer

    async def write_all() -> None:
        await asyncio.gather(*(store.set(key, buffer.from_bytes(data))
                               for key, data in items.items()))

    _run(write_all())


def set_bytes_if_not_exists(store: Any, key: str, data: bytes) -> None:
    """Write ``data`` as ``key`` of ``store`` unless the key exists (a conditional create)."""
    from zarr.buffer import default_buffer_prototype

    _run(store.set_if_not_exists(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete_key(store: Any, key: str) -> None:
    _run(store.delete(key))


def list_dir(store: Any, prefix: str) -> list[str]:
    """The names right below ``prefix`` in ``store`` (any zarr store): files and folders."""
    async def listed() -> list[str]:
        return [key async for key in store.list_dir(prefix)]

    return list(_run(listed()))


def open_arrays(group: Any, skip: frozenset[str]) -> list[tuple[str, Any]]:
    """The arrays right below ``group`` (a ``zarr.Group``) but those named in ``skip``, sorted
    by name; subgroups and objects that are no zarr node are left out.

    Unlike ``group.arrays()`` this neither warns of layerscope's own folder nor needs a
    ``warnings.catch_warnings`` to hide that warning: such a filter is process-wide, so
    another thread leaving its own may drop it meanwhile."""
    import zarr

    names = sorted(name for name in list_dir(group.store, group.path) if name not in skip)
    inner = getattr(group, "_async_group", None)
    if PRIVATE_API and inner is not None and hasattr(inner, "getitem"):
        async def opened() -> list[Any]:  # concurrently, at most as many as zarr's own walk
            limit = asyncio.Semaphore(int(zarr.config.get("async.concurrency") or 10))
            return list(await asyncio.gather(*(_member(inner, name, limit) for name in names)))

        nodes = [None if node is None else zarr.Array(node) if _is_async_array(node) else node
                 for node in _run(opened())]
    else:
        nodes = [_sync_member(group, name) for name in names]
    return [(name, node) for name, node in zip(names, nodes, strict=True)
            if isinstance(node, zarr.Array)]


async def _member(group: Any, name: str, limit: asyncio.Semaphore) -> Any:
    async with limit:
        try:
            return await group.getitem(name)
        except KeyError:  # an object or a folder that holds no zarr node
            return None


def _sync_member(group: Any, name: str) -> Any:
    try:
        return group[name]
    except KeyError:
        return None


def _is_async_array(node: Any) -> bool:
    from zarr import AsyncArray

    return isinstance(node, AsyncArray)


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    sync = _private_sync()
    return sync(coroutine) if sync is not None else _run_on_own_loop(coroutine)


def get_bytes(store: Any, key: str) -> bytes | None:
    """``key`` of ``store`` (any zarr store) as bytes, or None where it does not exist."""
    from zarr.buffer import default_buffer_prototype

    coroutine = store.get(key, prototype=default_buffer_prototype())
    sync = _private_sync()
    value = sync(coroutine) if sync is not None else _run_on_own_loop(coroutine)
    return None if value is None else bytes(value.to_bytes())


def _private_sync() -> Callable[[Coroutine[Any, Any, Any]], Any] | None:
    if not PRIVATE_API:
        return None
    try:
        from zarr.core.sync import sync
    except ImportError:
        return None
    return sync


def _run_on_own_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` to its end on a new event loop in a thread of its own (the caller's
    thread may already run a loop, e.g. in a notebook)."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as exc:  # raised again in the caller
            error.append(exc)

    thread = threading.Thread(target=run, name="layerscope-zarr-call")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def array_from_document(store: Any, name: str, document: dict[str, Any]) -> Any:
    """A read-only ``zarr.Array`` of ``store``'s array ``name`` described by ``document``
    (its consolidated metadata, shape cut to the committed rows), without parsing the
    metadata of every other array; else opened from its own ``zarr.json`` and cut there."""
    import zarr

    if PRIVATE_API:
        try:
            from zarr.core.array import AsyncArray
            from zarr.storage import StorePath

            metadata: Any = document  # the v3 metadata dict zarr parses itself
            return zarr.Array(AsyncArray(metadata, StorePath(store, name)))
        except (ImportError, TypeError, ValueError):
            pass
    array = zarr.open_array(store, path=name, mode="r")
    return array[: int(document["shape"][0])] if array.shape[0] > document["shape"][0] \
        else array


def create_array(group: Any, name: str, write: Callable[[str, bytes], None] | None = None,
                 **options: Any) -> tuple[Any, dict[str, Any]]:
    """``group.create_array(name, **options)`` and the array's metadata document, faster
    where it may be: zarr's own checks cost milliseconds an array, and a model traced at
    thousands of sites creates thousands.

    Fast path: zarr makes the metadata once per layout (shape, chunks, dtype, codecs, ...)
    in memory; each array gets a copy with its own attributes and dimension names, its
    ``zarr.json`` written by ``write(key, bytes)`` (default: the store's ``set``). Text
    arrays, and a zarr without these internals, take zarr's own path."""
    import zarr

    dtype = options.get("dtype")
    fast = PRIVATE_API and dtype is not str and np.dtype(dtype).kind not in "UTOSV"
    try:
        from zarr.core.array import AsyncArray
        from zarr.storage import StorePath
    except ImportError:
        fast = False
    if not fast:
        array = group.create_array(name, **options)
        return array, json.loads(json.dumps(array.metadata.to_dict(), allow_nan=True))
    attributes = options.pop("attributes", {})
    names = options.pop("dimension_names", None)
    path = f"{group.path}/{name}" if group.path else name
    layout = (type(group.store), *[(key, _token(options[key])) for key in sorted(options)])
    template = _TEMPLATES.get(layout)
    if template is None:
        made = zarr.create_array(zarr.storage.MemoryStore(), **options).metadata
        # zarr's codec pipeline for the store's kind, made once: arrays of a layout share it
        # (it holds their codecs, no state); the store itself is not kept
        shared = AsyncArray(made, StorePath(group.store, path), options.get("config"))
        object.__setattr__(shared, "store_path", None)
        template = _TEMPLATES[layout] = _Template(made, json.loads(json.dumps(made.to_dict())),
                                                  shared)
    dimension_names = None if names is None else list(names)
    document = {**template.document, "attributes": attributes,
                "dimension_names": dimension_names}
    encoded = template.text(attributes, dimension_names)
    if write is not None:
        write(f"{path}/zarr.json", encoded)
    else:
        set_bytes(group.store, f"{path}/zarr.json", encoded)
    # frozen dataclasses: each array its own names, attributes and path
    metadata = _replaced(template.metadata, attributes=dict(attributes),
                         dimension_names=None if names is None else tuple(names))
    array = _replaced(template.array, metadata=metadata, store_path=StorePath(group.store, path))
    return zarr.Array(array), document


class _Template:
    """What every array of one layout shares: zarr's metadata for it, that metadata as a JSON
    document, an array of it without a store, and the document's JSON text around its
    attributes and dimension names (a thousand arrays' whole documents took tens of ms to
    encode; their attributes alone, a fraction)."""

    _HOLES = ("\x00attributes", "\x00dimension_names")

    def __init__(self, metadata: Any, document: dict[str, Any], array: Any) -> None:
        self.metadata, self.document, self.array = metadata, document, array
        marked = json.dumps({**document, "attributes": self._HOLES[0],
                             "dimension_names": self._HOLES[1]}, allow_nan=False)
        holes = sorted((marked.index(json.dumps(hole)), hole) for hole in self._HOLES)
        (first, one), (second, other) = holes
        self._order = (one, other)
        self._parts = (marked[:first], marked[first + len(json.dumps(one)):second],
                       marked[second + len(json.dumps(other)):])

    def text(self, attributes: dict[str, Any], dimension_names: list[str] | None) -> bytes:
        """The encoded document of an array with ``attributes`` and ``dimension_names``:
        what ``json.dumps`` gives for the whole (its separators join any value alike)."""
        values = {self._HOLES[0]: json.dumps(attributes, allow_nan=False),
                  self._HOLES[1]: json.dumps(dimension_names)}
        head, middle, tail = self._parts
        return (head + values[self._order[0]] + middle + values[self._order[1]]
                + tail).encode()


def _replaced(frozen: Any, **changes: Any) -> Any:
    """A copy of the frozen dataclass ``frozen`` with ``changes`` (no checks: what
    ``copy.copy`` then setting each would give, in one step)."""
    if not hasattr(frozen, "__dict__"):  # slots: the general way
        import copy

        made = copy.copy(frozen)
        for key, value in changes.items():
            object.__setattr__(made, key, value)
        return made
    made = object.__new__(type(frozen))
    made.__dict__.update(frozen.__dict__, **changes)
    return made


#: layout (the store's kind and the creation options less names and attributes) -> what
#: its arrays share
_TEMPLATES: dict[tuple[Any, ...], _Template] = {}


def _token(value: Any) -> Any:
    """``value`` as part of a layout's key. Immutable objects of zarr's (codecs) and numpy's
    (dtypes) are named by a ``repr`` made once per object: making the ``repr`` of every
    creation option took a tenth of an array's creation in a close that makes a thousand."""
    kind = type(value)
    if kind in _AS_THEY_ARE:
        return value
    if kind is tuple or kind is list:  # shapes: their ints as they are, no call each
        return (kind.__name__, *[item if type(item) in _AS_THEY_ARE else _token(item)
                                 for item in value])
    if isinstance(value, np.dtype):
        return value
    params = getattr(value, "__dataclass_params__", None)
    if params is None or not params.frozen:
        return repr(value)  # a float (NaN is no key), a dict (it may change): each time
    kept = _REPRS.get(id(value))
    if kept is None or kept[0] is not value:
        if len(_REPRS) > _MEMO_SIZE:
            _REPRS.clear()
        kept = _REPRS[id(value)] = (value, repr(value))  # the object kept: its id stays its own
    return kept[1]


_AS_THEY_ARE = frozenset({int, str, bool, type(None)})
_REPRS: dict[int, tuple[Any, str]] = {}


def grow_rows(array: Any, rows: int) -> None:
    """Give ``array`` ``rows`` rows so zarr's own writes up to there pass its bounds check.

    Fast path: in memory only; the array's ``zarr.json`` keeps its old length (readers take
    lengths from the root's consolidated metadata). Fallback: ``Array.resize``, which also
    rewrites the array's ``zarr.json``.
    """
    if not _set_rows_in_memory(array, rows):
        array.resize((rows, *array.shape[1:]))


def set_shape(array: Any, shape: tuple[int, ...]) -> None:
    """Give ``array`` ``shape`` (a token axis grown), in memory where zarr allows it like
    :func:`grow_rows`; else with ``Array.resize``, which also rewrites its ``zarr.json``
    (readers take shapes from the root's consolidated metadata either way)."""
    if not _set_shape_in_memory(array, tuple(shape)):
        array.resize(tuple(shape))


def save_rows(array: Any, rows: int, trailing: tuple[int, ...] | None = None) -> None:
    """Write ``array``'s own ``zarr.json`` with ``rows`` rows (the committed ones, at close).

    The fallback's ``Array.resize`` deletes chunks that lie wholly past ``rows``: rows nobody
    committed, which no reader trusts and an append overwrites.
    """
    shape = (rows, *(trailing if trailing is not None else array.shape[1:]))
    if _set_shape_in_memory(array, shape):
        array.resize(array.shape)  # the same shape: writes zarr.json, deletes nothing
    else:
        array.resize(shape)


def set_attributes(array: Any, attributes: dict[str, Any]) -> None:
    """Give ``array`` new ``attributes`` in memory where zarr allows it (its ``zarr.json`` gets
    them at the close, with the committed length); else with ``update_attributes``, which
    writes them at once."""
    if PRIVATE_API:
        inner = _async_array(array)
        metadata: Any = getattr(inner, "metadata", None)
        update = getattr(metadata, "update_attributes", None)
        if update is not None and dataclasses.is_dataclass(inner):
            object.__setattr__(inner, "metadata", update(dict(attributes)))
            return
    array.update_attributes(dict(attributes))


def _set_rows_in_memory(array: Any, rows: int) -> bool:
    """Replace the frozen metadata of ``array``'s ``AsyncArray`` with one of ``rows`` rows;
    False where this zarr does not allow it (nothing was changed that matters then)."""
    if not PRIVATE_API:
        return False
    metadata: Any = getattr(_async_array(array), "metadata", None)
    if metadata is None:
        return False
    return _set_shape_in_memory(array, (rows, *metadata.shape[1:]))


def _set_shape_in_memory(array: Any, shape: tuple[int, ...]) -> bool:
    """Replace the frozen metadata of ``array``'s ``AsyncArray`` with one of ``shape``;
    False where this zarr does not allow it."""
    if not PRIVATE_API:
        return False
    inner = _async_array(array)
    metadata: Any = getattr(inner, "metadata", None)
    update_shape = getattr(metadata, "update_shape", None)
    if update_shape is None or not dataclasses.is_dataclass(inner):
        return False
    object.__setattr__(inner, "metadata", update_shape(shape))
    return bool(tuple(array.shape) == shape)


def fast_paths(array: Any) -> dict[str, bool]:
    """Which private paths this zarr offers for ``array`` (a test pins them all to True, so
    a zarr upgrade that silently drops one is noticed)."""
    return {
        "encode chunks": chunk_encoder(array) is not None,
        "sync store writes": _private_sync() is not None,
        "rows in memory": _rows_in_memory_possible(array),
    }


def _async_array(array: Any) -> Any:
    """The ``AsyncArray`` behind ``array``: the public ``async_array``, else the private name."""
    inner = getattr(array, "async_array", None)
    return inner if inner is not None else getattr(array, "_async_array", None)


def _rows_in_memory_possible(array: Any) -> bool:
    inner = _async_array(array)
    return (PRIVATE_API and dataclasses.is_dataclass(inner)
            and hasattr(getattr(inner, "metadata", None), "update_shape"))
