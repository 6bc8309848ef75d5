"""The probe of an estimate: the model run once, on the first samples of its first batch,
through the real trace machinery into a store held in memory (nothing touches the disk), and
what that store holds read back: each array's shape, dims, codecs and file sizes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from layerscope.batches import Call
from layerscope.core import LayerscopeError, StoreOptions
from layerscope.core.manifest import MANIFEST_DIR

#: samples a probe runs: two, not one, because a tensor of one sample cannot be told from one
#: computed once and broadcast over the batch (position embeddings), which a trace of larger
#: batches skips; a trace whose batches hold one sample is probed with one
PROBE_SAMPLES = 2


@dataclass(frozen=True)
class ProbedArray:
    """One array of the probe's store, as the writer made it."""

    name: str
    dims: tuple[str, ...]
    trailing: tuple[int, ...]  # one sample's shape
    itemsize: int  # bytes per element as the writer sized its chunks (text: 4 per character)
    text: bool  # variable-length strings
    compressed: bool  # the writer chose to compress it (from the probe's own bytes)
    checksum: bool  # each chunk file ends in a crc32c
    rows: int  # samples the probe wrote
    chunk_files: tuple[int, ...]  # the sizes of its chunk files
    metadata_bytes: int  # its zarr.json
    text_bytes: int  # text arrays: the UTF-8 bytes of the probe's strings
    manifest_entry_bytes: float  # what one of its chunk files adds to a batch's manifest
    #: written by a traced generate() block by block (never gathered): a generated variable
    #: with a ``token``/``query`` axis
    in_blocks: bool = False


@dataclass(frozen=True)
class Probe:
    arrays: tuple[ProbedArray, ...]
    root_bytes: int  # the root zarr.json (attributes and consolidated metadata)
    manifests: bool  # batches write a checksum manifest
    samples: int
    seconds: float


def call_batch_size(call: Call) -> int:
    """The number of samples a planned call runs: the leading axis of its first array."""
    for value in (*call.args, *call.kwargs.values()):
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    if call.texts is not None:
        return len(call.texts)
    raise LayerscopeError("cannot tell the batch size of the inputs: pass arrays or tensors "
                          "whose first axis is the batch")


def first_samples(call: Call, size: int, count: int) -> Call:
    """``call`` cut to its first ``count`` samples: every array whose leading axis is the
    batch of ``size`` is sliced, anything else passed as it is."""
    if count >= size:
        return call

    def cut(value: Any) -> Any:
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) >= 1 and int(shape[0]) == size:
            return value[:count]
        return value

    return Call(tuple(cut(a) for a in call.args), {k: cut(v) for k, v in call.kwargs.items()},
                None if call.texts is None else list(call.texts[:count]))


def run_probe(write: Callable[[Any, StoreOptions], None], options: StoreOptions,
              samples: int) -> Probe:
    """Call ``write(store, options)``, which traces the probe's samples into ``store`` (a new
    zarr store in memory), and read back what it wrote."""
    from zarr.storage import MemoryStore

    contents: dict[str, Any] = {}
    store = MemoryStore(store_dict=contents)
    started = time.perf_counter()
    write(store, replace(options, mode="w-"))
    return read_probe(store, contents, samples, time.perf_counter() - started)


def read_probe(store: Any, contents: dict[str, Any], samples: int, seconds: float) -> Probe:
    import zarr

    sizes = {key: _size(value) for key, value in contents.items()}
    entries = _manifest_entries(contents)
    # the arrays are the folders with a zarr.json (zarr's own listing warns about the
    # store's _layerscope folder)
    names = sorted(key[: -len("/zarr.json")] for key in sizes
                   if key.count("/") == 1 and key.endswith("/zarr.json"))
    arrays = [_probed(name, zarr.open_array(store, path=name, mode="r"), sizes,
                      entries.get(name, [])) for name in names]
    if not arrays:
        raise LayerscopeError("the probe captured nothing: check --capture / capture= and "
                              "--kinds / kinds=")
    return Probe(tuple(arrays), sizes.get("zarr.json", 0), bool(entries) or any(
        key.startswith(MANIFEST_DIR) for key in sizes), samples, seconds)


def _size(value: Any) -> int:
    return len(value.to_bytes()) if hasattr(value, "to_bytes") else len(value)


def _manifest_entries(contents: dict[str, Any]) -> dict[str, list[int]]:
    """Array name -> the bytes each of its chunk files takes in the probe's manifests."""
    found: dict[str, list[int]] = {}
    for key, value in contents.items():
        if not key.startswith(MANIFEST_DIR + "/"):
            continue
        raw = value.to_bytes() if hasattr(value, "to_bytes") else bytes(value)
        for chunk, record in json.loads(raw).get("chunks", {}).items():
            entry = len(json.dumps({chunk: record})) - 2 + len(", ")
            found.setdefault(chunk.rsplit("/", 1)[0], []).append(entry)
    return found


def _probed(name: str, array: Any, sizes: dict[str, int], entries: list[int]) -> ProbedArray:
    from zarr.codecs import BloscCodec, Crc32cCodec

    codecs = list(array.metadata.codecs)
    text = array.dtype.kind not in "biufc"
    values = array[:] if text else None
    if values is not None:
        strings = [str(v) for v in np.asarray(values).reshape(-1)]
        itemsize = 4 * max((len(s) for s in strings), default=1)
        text_bytes = sum(len(s.encode()) for s in strings)
    else:
        itemsize, text_bytes = int(array.dtype.itemsize), 0
    prefix = f"{name}/c."
    files = tuple(size for key, size in sorted(sizes.items()) if key.startswith(prefix))
    dims = tuple(str(d) for d in (array.metadata.dimension_names or ()))
    return ProbedArray(
        name, dims, tuple(int(n) for n in array.shape[1:]), max(1, itemsize), text,
        any(isinstance(c, BloscCodec) for c in codecs),
        bool(codecs) and isinstance(codecs[-1], Crc32cCodec), int(array.shape[0]), files,
        sizes.get(f"{name}/zarr.json", 0), text_bytes,
        float(np.mean(entries)) if entries else 0.0,
        bool(array.attrs.get("generated")) and any(
            d.removeprefix("decoder_") in ("token", "query") for d in dims[1:]),
    )
