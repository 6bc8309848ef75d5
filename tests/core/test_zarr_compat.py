"""zarr's internals in one module: the fast paths are taken with the installed zarr, and the
public fallbacks a zarr without them would take store the same values, bit for bit."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

import layerscope
from layerscope.core import _zarr_compat
from layerscope.core.chunkfile import ChunkFiles
from layerscope.core.chunkwrite import ChunkWriter
from layerscope.core.commit import publish
from layerscope.core.writer import CHUNK_KEYS

from .test_writer import make_recorder

TEXTS = ["one", "two words", "three words here", "four", "", "sixth", "seven", "eight."]


def _write(recorder, sizes, start=0, keep_open=False):
    """Batches of ``sizes`` samples: text, token ids, floats compressed and not, ints."""
    written = []
    for number, size in enumerate(sizes, start):
        rng = np.random.default_rng(number)
        hidden = rng.standard_normal((size, 6, 5), np.float32)
        sparse = np.where(rng.random((size, 6, 6)) < 0.8, 0, rng.random((size, 6, 6)))
        ids = rng.integers(0, 1000, (size, 6))
        recorder.set_texts(TEXTS[:size])
        recorder.begin_pass(size, token_ids=ids)
        recorder.put("block", "output", hidden, ("batch", "token", "hidden"))
        recorder.put("attn", "attention", sparse.astype(np.float32), ("batch", "query", "key"))
        recorder.put("argmax", "output", ids % 7, ("batch", "token"))
        recorder.end_pass()
        written.append({"block@output": hidden, "attn@attention": sparse.astype(np.float32),
                        "argmax@output": ids % 7, "token_id": ids,
                        "input_text": np.asarray(TEXTS[:size])})
    if not keep_open:
        recorder.close()
    return {name: np.concatenate([batch[name] for batch in written]) for name in written[0]}


def _wait_committed(recorder, batches):
    deadline = time.monotonic() + 30
    while recorder.writer.committed[0] < batches:
        recorder.writer.raise_if_failed()
        assert time.monotonic() < deadline, "the writer did not commit"
        time.sleep(0.01)


def _stored_rows(path: Path, name: str) -> int:
    return int(json.loads((path / name / "zarr.json").read_text())["shape"][0])


def _assert_reads_back(path, expected):
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete"
    for name, values in expected.items():
        stored = ds[name].values
        assert stored.dtype == values.dtype or values.dtype.kind == "U", name
        np.testing.assert_array_equal(stored, values, err_msg=name)
        if values.dtype.kind == "f":  # bit for bit, NaN payloads and signed zeros included
            assert stored.tobytes() == values.tobytes(), name
    rows = len(next(iter(expected.values())))
    direct = zarr.open_array(path / "block@output", mode="r")
    assert direct.shape[0] == rows  # the array's own zarr.json holds the committed length
    np.testing.assert_array_equal(direct[:], expected["block@output"])


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(file.relative_to(path)): file.read_bytes()
            for file in sorted(path.glob("*/c.*"))}


def _array(root, name="v", **options):
    group = zarr.open_group(root, mode="a")
    return group.create_array(name, shape=(8, 3, 5), chunks=(4, 3, 5), dtype="float32",
                              chunk_key_encoding=CHUNK_KEYS, **options)


def test_the_fast_paths_are_taken_with_the_installed_zarr(tmp_path):
    """If a zarr upgrade drops an internal, this fails, not only the writer's speed."""
    assert _zarr_compat.fast_paths(_array(tmp_path / "a")) == {
        "encode chunks": True, "sync store writes": True, "rows in memory": True}
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    expected = _write(recorder, (4, 4, 3), keep_open=True)
    _wait_committed(recorder, 3)
    writers = {name: var.chunk_writer for name, var in recorder.writer.variables.items()}
    assert writers and all(w is not None and w.enabled for w in writers.values())
    # the partial third batch grew the arrays in memory only: zarr.json still says 0 rows
    assert _stored_rows(path, "block@output") == 0
    recorder.close()
    assert _stored_rows(path, "block@output") == 11
    _assert_reads_back(path, expected)


def test_the_public_fallback_stores_the_same_trace(tmp_path, monkeypatch):
    """Whole chunks, a partial chunk and an append, written without any zarr internal, read
    back exactly and leave the very chunk files the fast path writes."""
    fast = tmp_path / "fast.zarr"
    _write(make_recorder(fast), (4, 4, 3))
    _write(make_recorder(fast, mode="a"), (4, 2), start=3)

    monkeypatch.setattr(_zarr_compat, "PRIVATE_API", False)
    assert not any(_zarr_compat.fast_paths(_array(tmp_path / "a")).values())
    path = tmp_path / "public.zarr"
    recorder = make_recorder(path)
    first = _write(recorder, (4, 4, 3), keep_open=True)
    _wait_committed(recorder, 3)
    assert not any(var.chunk_writer.enabled for var in recorder.writer.variables.values())
    assert _stored_rows(path, "block@output") >= 11  # grown with Array.resize
    recorder.close()
    _assert_reads_back(path, first)
    second = _write(make_recorder(path, mode="a"), (4, 2), start=3)
    expected = {name: np.concatenate([first[name], second[name]]) for name in first}
    _assert_reads_back(path, expected)
    _assert_reads_back(fast, expected)
    assert _chunk_files(path) == _chunk_files(fast)


def test_arrays_of_one_layout_share_zarrs_objects_and_arrays_of_others_do_not(tmp_path):
    """``create_array`` makes zarr's metadata, codec pipeline and chunk encoder once a layout
    (the store's kind and every option but names and attributes): each array it makes has
    the metadata zarr itself gives for its options, its own path, and the chunk encoder of
    its own codecs, fill value and dtype."""
    import dataclasses

    from zarr.codecs import BloscCodec, Crc32cCodec
    from zarr.core.array import AsyncArray

    def options(**changed):
        base = dict(shape=(0, 3, 5), chunks=(4, 3, 5), dtype=np.dtype("float32"),
                    fill_value=float("nan"), compressors=[Crc32cCodec()],
                    chunk_key_encoding=CHUNK_KEYS, config={"write_empty_chunks": True})
        return {**base, **changed}

    layouts = {
        "plain": options(), "again": options(),
        "compressed": options(compressors=[BloscCodec(cname="lz4", clevel=1), Crc32cCodec()]),
        "zero fill": options(fill_value=0.0), "ints": options(dtype=np.dtype("int32"),
                                                              fill_value=0),
        "wider": options(shape=(0, 3, 6), chunks=(4, 3, 6)),
    }
    stores = {"memory": zarr.storage.MemoryStore(), "local": zarr.storage.LocalStore(tmp_path)}
    made = {}
    for kind, store in stores.items():
        group, reference = zarr.open_group(store, mode="w"), zarr.open_group({}, mode="w")
        for name, layout in layouts.items():
            extra = dict(dimension_names=["batch", name, "x"], attributes={"site": name})
            array, document = _zarr_compat.create_array(group, name, **layout, **extra)
            expected = reference.create_array(name, **layout, **extra).metadata.to_dict()
            assert json.loads(json.dumps(array.metadata.to_dict())) == document
            assert json.dumps(array.metadata.to_dict()) == json.dumps(expected), (kind, name)
            assert array.path == name and array.store is store
            if kind == "local":  # the document's text, made from the layout's, as json.dumps
                assert (tmp_path / name / "zarr.json").read_bytes() \
                    == json.dumps(document, allow_nan=False).encode()
            made[kind, name] = array
        # an array of a known layout with no dimension names and other attributes
        odd = {"site": "naïve \"quoted\"", "roles": [["a", 1], {"b": None}], "n": 1.5}
        array, document = _zarr_compat.create_array(group, "unnamed", **layouts["plain"],
                                                    attributes=odd)
        expected = reference.create_array("unnamed", **layouts["plain"], attributes=odd)
        assert json.dumps(array.metadata.to_dict()) == json.dumps(expected.metadata.to_dict())
        assert document["dimension_names"] is None and document["attributes"] == odd
        if kind == "local":
            assert json.loads((tmp_path / "unnamed" / "zarr.json").read_bytes()) == document
    encoders = {key: _zarr_compat.chunk_encoder(array) for key, array in made.items()}
    pipeline = {key: array._async_array.codec_pipeline for key, array in made.items()}
    for kind in stores:
        assert encoders[kind, "plain"] is encoders[kind, "again"]
        assert pipeline[kind, "plain"] is pipeline[kind, "again"]
        others = [encoders[kind, name] for name in layouts if name not in ("plain", "again")]
        assert len({id(encoder) for encoder in [encoders[kind, "plain"], *others]}) == 5
    assert encoders["memory", "plain"].raw and not encoders["memory", "compressed"].raw
    # metadata that shares its chunk grid and dtype with another's, not its codecs
    plain = made["memory", "plain"]
    swapped = dataclasses.replace(plain.metadata,
                                  codecs=made["memory", "compressed"].metadata.codecs)
    other = zarr.Array(AsyncArray(swapped, plain._async_array.store_path, plain.config))
    assert not _zarr_compat.chunk_encoder(other).raw
    data = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    for name in ("plain", "compressed", "zero fill", "wider"):  # as zarr itself stores it
        array = made["local", name]
        shaped = np.resize(data, array.metadata.chunk_grid.chunk_shape)
        _zarr_compat.grow_rows(array, 4)
        array[0:4] = shaped
        stored = (tmp_path / name / "c.0.0.0").read_bytes()
        encoded = encoders["local", name].encode(shaped).tobytes()
        assert stored[:-4] == encoded, name


@pytest.mark.parametrize("private", [True, False], ids=["fast", "public"])
def test_a_store_without_local_files(monkeypatch, private):
    """Chunks and commits go through the store's own ``set`` (here a MemoryStore)."""
    monkeypatch.setattr(_zarr_compat, "PRIVATE_API", private)
    store = zarr.storage.MemoryStore()
    recorder = make_recorder(store)
    expected = _write(recorder, (4, 4, 3), keep_open=True)
    _wait_committed(recorder, 3)
    writer = recorder.writer.variables["block@output"].chunk_writer
    assert writer.enabled is private and (writer.setter is not None) is private
    recorder.close()
    ds = layerscope.open_trace(store)
    assert ds.attrs["committed_samples"] == 11
    for name, values in expected.items():
        np.testing.assert_array_equal(ds[name].values, values, err_msg=name)


@pytest.mark.parametrize("private", [True, False], ids=["fast", "public"])
def test_publish_writes_the_root_document_of_any_store(monkeypatch, private):
    monkeypatch.setattr(_zarr_compat, "PRIVATE_API", private)
    store = zarr.storage.MemoryStore()
    group = zarr.open_group(store, mode="w", zarr_format=3)
    publish(group, {"status": "writing", "committed_samples": 0}, {}, 0)
    assert dict(zarr.open_group(store, mode="r").attrs) == {"status": "writing",
                                                            "committed_samples": 0}


def test_an_array_zarr_cannot_encode_synchronously_is_written_by_zarr(tmp_path):
    """Sharding has no synchronous encoder: that array's chunks go through zarr."""
    data = np.random.default_rng(3).standard_normal((8, 3, 5)).astype(np.float32)
    array = _array(tmp_path, shards=(8, 3, 5))
    writer = ChunkWriter(array, ChunkFiles(tmp_path))
    assert _zarr_compat.fast_paths(array)["encode chunks"] is False
    assert not writer.enabled and not writer.covers(0, data)
    with pytest.raises(layerscope.LayerscopeError):
        writer.write(0, data)
    array[:] = data
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "v", mode="r")[:], data)


@pytest.mark.parametrize("private", [True, False], ids=["fast", "public"])
def test_rows_grow_for_zarrs_own_writes(tmp_path, monkeypatch, private):
    monkeypatch.setattr(_zarr_compat, "PRIVATE_API", private)
    array = _array(tmp_path)
    _zarr_compat.grow_rows(array, 20)
    assert array.shape == (20, 3, 5)
    array[16:20] = np.ones((4, 3, 5), np.float32)
    assert _stored_rows(tmp_path, "v") == (8 if private else 20)  # in memory only, or saved
    _zarr_compat.save_rows(array, 18)
    assert _stored_rows(tmp_path, "v") == 18
    reopened = zarr.open_array(tmp_path / "v", mode="r")
    np.testing.assert_array_equal(reopened[16:18], np.ones((2, 3, 5), np.float32))


def test_writing_and_reading_raise_no_deprecation_or_future_warning(tmp_path):
    """Nothing layerscope asks of zarr (or xarray, numpy) is deprecated, wherever the
    warning would be attributed (zarr's own ``stacklevel`` often names zarr, not us)."""
    path = tmp_path / "t.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _write(make_recorder(path), (4, 3))
        _write(make_recorder(path, mode="a"), (2,), start=2)
        ds = layerscope.open_trace(path)
        ds.load()
    found = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
             if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning,
                                        FutureWarning))]
    assert not found, found
