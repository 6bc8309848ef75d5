"""The streaming writer: appends, commit protocol, bounded queue, errors, crash safety."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import zarr

import layerscope
from layerscope.core import (
    CaptureError,
    Compression,
    Selection,
    StoreError,
    StoreOptions,
    WriterError,
    _zarr_compat,
)
from layerscope.core.format import new_group_attrs
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter


def make_recorder(path, mode="w-", **options):
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = open_group_for_writing(path, mode, attrs)
    writer = TraceWriter(group, StoreOptions(mode=mode, **options),
                         int(existing.get("committed_samples", 0)),
                         int(existing.get("committed_batches", 0)))
    return Recorder(writer, Selection(), "numpy")


def write_batches(recorder, count, size=4, start=0):
    arrays = []
    for b in range(start, start + count):
        rng = np.random.default_rng(b)
        hidden = rng.standard_normal((size, 5, 8), np.float32)
        recorder.begin_pass(size, token_ids=rng.integers(0, 100, (size, 5)))
        recorder.put("block.0", "output", hidden, ("batch", "token", "hidden"), "Block")
        recorder.put("block.0", "output", hidden * 2, ("batch", "token", "hidden"), "Block")
        recorder.end_pass()
        arrays.append(hidden)
    return np.concatenate(arrays)


def test_appended_batches_read_back_exactly(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    expected = write_batches(recorder, 5)
    recorder.close()
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete"
    assert ds.attrs["committed_batches"] == 5 and ds.attrs["committed_samples"] == 20
    np.testing.assert_array_equal(ds["block.0@output"].values, expected)
    # a module called twice in one pass: the second call is its own variable
    np.testing.assert_array_equal(ds["block.0@output.call1"].values, expected * 2)
    assert ds["block.0@output.call1"].attrs["call_index"] == 1
    assert ds["block.0@output"].attrs["layer"] == 0
    assert ds["block.0@output"].dims == ("batch", "token", "hidden")
    np.testing.assert_array_equal(ds["batch"].values, np.arange(20))
    assert ds["token_id"].dims == ("batch", "token")


def test_codecs_compress_with_checksum_and_no_object_codec(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    rng = np.random.default_rng(0)
    sparse = np.tril(rng.random((4, 64, 64), np.float32))  # as causal attention
    dense = rng.standard_normal((4, 64, 64), np.float32)
    recorder.begin_pass(4)
    recorder.put("causal", "output", sparse, ("batch", "token", "hidden"))
    recorder.put("dense", "output", dense, ("batch", "token", "hidden"))
    recorder.end_pass()
    recorder.close()

    def codec_names(name):
        meta = json.loads((path / name / "zarr.json").read_text())
        return [codec["name"] for codec in meta["codecs"]]

    assert codec_names("causal@output") == ["bytes", "blosc", "crc32c"]
    assert codec_names("dense@output") == ["bytes", "crc32c"]  # would shrink by under a fifth
    for var in path.iterdir():
        if (var / "zarr.json").is_file():
            text = (var / "zarr.json").read_text()
            assert "pickle" not in text and '"object"' not in text
    ds = layerscope.open_trace(path)
    np.testing.assert_array_equal(ds["causal@output"].values, sparse)
    np.testing.assert_array_equal(ds["dense@output"].values, dense)


def test_min_saving_zero_compresses_everything(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, compression=Compression(min_saving=0))
    write_batches(recorder, 1)
    recorder.close()
    meta = json.loads((path / "block.0@output" / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes", "blosc", "crc32c"]


def test_corrupted_chunk_is_detected(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    write_batches(recorder, 1)
    recorder.close()
    chunk = next((path / "block.0@output").glob("c.*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        layerscope.open_trace(path)["block.0@output"].load()


def test_append_mode_continues_the_batch_axis(tmp_path):
    path = tmp_path / "t.zarr"
    first = make_recorder(path)
    a = write_batches(first, 2)
    first.close()
    second = make_recorder(path, mode="a")
    b = write_batches(second, 2, start=2)
    second.close()
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 4
    np.testing.assert_array_equal(ds["block.0@output"].values, np.concatenate([a, b]))
    np.testing.assert_array_equal(ds["batch"].values, np.arange(16))


@pytest.mark.parametrize("private", [True, False])
def test_an_append_finds_the_arrays_among_other_members_without_a_warning(tmp_path, monkeypatch,
                                                                          private):
    """zarr's walk of a group for its arrays warns of layerscope's own folder, and the filter
    that would hide that is process-wide (another thread leaving its catch_warnings may drop
    it meanwhile): an append lists the group itself, with or without zarr's internals, and
    leaves out what is not a variable (a subgroup, a stray folder or file, an array without
    a batch axis)."""
    monkeypatch.setattr(_zarr_compat, "PRIVATE_API", private)
    monkeypatch.setattr(zarr.Group, "arrays", lambda group: pytest.fail("zarr walked the group"))
    path = tmp_path / "t.zarr"
    first = make_recorder(path)
    a = write_batches(first, 2)
    first.close()
    names = set(json.loads((path / "zarr.json").read_bytes())["consolidated_metadata"]["metadata"])
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group.create_group("notes")
    group.create_array("lookup", shape=(3,), dtype="int32", dimension_names=["row"])
    (path / "stray").mkdir()
    (path / "stray" / "readme.txt").write_text("not zarr")
    (path / "loose.txt").write_text("not zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = make_recorder(path, mode="a")
        assert set(second.writer.variables) == names and "block.0@output" in names
        b = write_batches(second, 1, start=2)
        second.close()
    got = layerscope.open_trace(path)["block.0@output"].values
    np.testing.assert_array_equal(got, np.concatenate([a, b]))


def test_modes_protect_existing_paths(tmp_path):
    path = tmp_path / "t.zarr"
    make_recorder(path).close()
    with pytest.raises(StoreError, match="already exists"):
        make_recorder(path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a layerscope trace"):
        make_recorder(other, mode="w")
    assert (other / "keep.txt").read_text() == "precious"
    with pytest.raises(StoreError, match="does not exist"):
        make_recorder(tmp_path / "missing" / "t.zarr")


def test_non_token_shape_change_between_batches_is_a_clear_error(tmp_path):
    """Only token axes may change length between passes (tests/core/test_growth.py)."""
    recorder = make_recorder(tmp_path / "t.zarr")
    write_batches(recorder, 1)
    recorder.begin_pass(4)
    with pytest.raises(CaptureError, match="only token axes"):
        recorder.put("block.0", "output", np.zeros((4, 5, 9), np.float32),
                     ("batch", "token", "hidden"))
    recorder.close(failed=True)


def test_worker_error_surfaces_in_the_caller(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    write_batches(recorder, 1)

    def broken(_):
        raise RuntimeError("device copy failed")

    recorder.begin_pass(4)
    recorder.put("bad", "output", np.zeros((4, 3), np.float32), ("batch", "hidden"),
                 to_numpy=broken)
    with pytest.raises(WriterError, match="device copy failed"):
        recorder.end_pass()
        recorder.close()
    with pytest.warns(UserWarning, match="aborted"):
        ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 1


def test_queue_is_bounded_by_bytes(tmp_path):
    """A slow disk makes producers wait instead of piling tensors up in memory."""
    recorder = make_recorder(tmp_path / "t.zarr", max_pending_bytes=1 << 20, workers=1)
    writer = recorder.writer
    gate = threading.Event()
    peak = []

    def slow(value):
        gate.wait(5)
        return value

    recorder.begin_pass(1)
    producer = threading.Thread(target=lambda: [
        recorder.put("x", "output", np.zeros((1, 1 << 17), np.float32), ("batch", "hidden"),
                     to_numpy=slow) if i == 0 else
        recorder.put("x", f"output.{i}", np.zeros((1, 1 << 17), np.float32), ("batch", "hidden"))
        for i in range(8)
    ])
    producer.start()
    producer.join(0.5)
    peak.append(writer._pool.pending)
    assert producer.is_alive(), "put should block while the budget is full"
    assert peak[0] <= 1 << 20
    gate.set()
    producer.join(5)
    recorder.close()


CRASH = textwrap.dedent("""
    import os, sys, numpy as np
    sys.path.insert(0, {tests!r})
    from core.test_writer import make_recorder, write_batches
    recorder = make_recorder({path!r})
    write_batches(recorder, 3)
    recorder.writer.close  # keep the writer running
    recorder.begin_pass(4)
    recorder.put("block.0", "output", np.ones((4, 5, 8), np.float32), ("batch", "token", "hidden"))
    import time; time.sleep(0.5)
    os._exit(1)  # die mid-batch, without closing
""")


def test_crash_leaves_committed_batches_readable(tmp_path):
    path = tmp_path / "t.zarr"
    tests = str(__import__("pathlib").Path(__file__).parents[1])
    subprocess.run([sys.executable, "-c", CRASH.format(tests=tests, path=str(path))], check=False)
    with pytest.warns(UserWarning, match="writing"):
        ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "writing"
    assert ds.attrs["committed_batches"] == 3
    assert ds.sizes["batch"] == 12
    expected = np.concatenate([np.random.default_rng(b).standard_normal((4, 5, 8), np.float32)
                               for b in range(3)])
    np.testing.assert_array_equal(ds["block.0@output"].values, expected)
    with pytest.raises(StoreError, match="writing"):
        layerscope.open_trace(path, complete_only=True)
    assert zarr.open_group(path, mode="r").attrs["status"] == "writing"


def test_a_site_skipped_once_stays_skipped(tmp_path):
    """A broadcast (1, ...) tensor must not be stored for the batches that happen to hold one
    sample and left as fill values for the others."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    for size in (2, 1):
        recorder.begin_pass(size)
        recorder.put("table", "output", np.ones((1, 3), np.float32), ("batch", "hidden"))
        recorder.put("x", "output", np.ones((size, 3), np.float32), ("batch", "hidden"))
        recorder.end_pass()
    recorder.close()
    ds = layerscope.open_trace(path)
    assert "table@output" not in ds and ds.sizes["batch"] == 3
    assert ds.attrs["skipped"] == {"table@output": "shape (1, 3) has no leading batch axis of 2"}


def test_compression_is_decided_on_the_whole_first_batch(tmp_path):
    """The first sample may be the one without padding; the batch decides."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    data = np.random.default_rng(0).random((4, 64, 64), np.float32)
    data[1:, :, 8:] = 0  # samples 1-3 attend to 8 real tokens, the rest is padding
    recorder.begin_pass(4)
    recorder.put("attn", "attention", data, ("batch", "query", "key"))
    recorder.end_pass()
    recorder.close()
    meta = json.loads((path / "attn@attention" / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes", "blosc", "crc32c"]
    np.testing.assert_array_equal(layerscope.open_trace(path)["attn@attention"].values, data)


def test_an_axis_grown_while_an_array_is_created_reaches_it(tmp_path):
    """A writer thread writes a new array's zarr.json outside the lock that growth and
    attribute updates take: what they change meanwhile still reaches the array."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, workers=1)
    writer = recorder.writer
    files, write_document = writer._files, writer._files.document
    met = []
    created = threading.Event()

    def meanwhile() -> None:  # what the model's thread may do while the file is written
        writer._grow({"token": 7})
        writer.update_attrs("block.0@output", {"extra": 1})

    def document(key, data):
        if key.startswith("block.0@output/") and not met:
            other = threading.Thread(target=meanwhile)
            other.start()
            other.join(10)
            met.append(not other.is_alive())  # False: it waited for the lock
            created.set()
        write_document(key, data)

    files.document = document
    rng = np.random.default_rng(0)
    first = rng.standard_normal((4, 5, 8), np.float32)
    recorder.begin_pass(4)
    recorder.put("block.0", "output", first, ("batch", "token", "hidden"), "Block")
    recorder.end_pass()
    assert created.wait(30)  # the next pass must not grow the axis before the array exists
    second = rng.standard_normal((4, 7, 8), np.float32)
    recorder.begin_pass(4)
    recorder.put("block.0", "output", second, ("batch", "token", "hidden"), "Block")
    recorder.end_pass()
    recorder.close()
    assert met == [True]
    ds = layerscope.open_trace(path)
    values = ds["block.0@output"]
    assert values.sizes["token"] == 7 and values.attrs["extra"] == 1
    np.testing.assert_array_equal(values.values[:4, :5], first)
    assert np.isnan(values.values[:4, 5:]).all()
    np.testing.assert_array_equal(values.values[4:], second)
    assert zarr.open_array(path / "block.0@output", mode="r").shape == (8, 7, 8)


def test_two_threads_that_need_one_array_create_it_once(tmp_path):
    """Each writer thread decides compression on its own batch: were both to write the
    array's zarr.json, the file could hold other codecs than those a commit publishes."""
    recorder = make_recorder(tmp_path / "t.zarr")
    writer = recorder.writer
    var = writer._variable("v@output", ("batch", "hidden"), (4, 256), {})
    files, write_document, written = writer._files, writer._files.document, []

    def slow_document(key, data):
        written.append(key)
        threading.Event().wait(0.3)  # the other thread arrives meanwhile
        write_document(key, data)

    files.document = slow_document
    samples = [np.zeros((4, 256), np.float32),  # compressible
               np.random.default_rng(0).standard_normal((4, 256), np.float32)]
    threads = [threading.Thread(target=writer._create_array, args=(var, sample))
               for sample in samples]
    for thread in threads:
        thread.start()
        threading.Event().wait(0.05)
    for thread in threads:
        thread.join(10)
    assert written == ["v@output/zarr.json"]
    on_disk = json.loads((tmp_path / "t.zarr" / "v@output" / "zarr.json").read_text())
    assert on_disk["codecs"] == var.document["codecs"]
    recorder.close()


def test_a_text_array_made_while_its_token_axis_grows_is_published_grown(tmp_path, monkeypatch):
    """A writer thread makes ``token_text``'s array at the first pass's length while the next
    pass lengthens the token axis (the race behind a flaky DamagedStoreError: 'conflicting
    sizes for dimension token'). Here the array is made in memory, then the second pass runs
    and ends, then the array is published, every time: it is published at the grown length,
    as every other array is."""
    recorder = make_recorder(tmp_path / "t.zarr")
    recorder.decode_tokens = lambda ids: [f"t{i}" for i in ids]
    new_array = TraceWriter.new_array
    made, second_pass_ended = threading.Event(), threading.Event()

    def made_before_the_growth(self, var, sample, region=None):
        array = new_array(self, var, sample, region)
        if var.name == "token_text" and not made.is_set():
            made.set()
            assert second_pass_ended.wait(30)
        return array

    monkeypatch.setattr(TraceWriter, "new_array", made_before_the_growth)
    for length in (4, 9):
        recorder.begin_pass(2, np.arange(2 * length).reshape(2, length))
        recorder.put("x", "output", np.ones((2, length, 3), np.float32),
                     ("batch", "token", "hidden"))
        recorder.end_pass()
        assert made.wait(30)
    second_pass_ended.set()
    recorder.close()
    ds = layerscope.open_trace(tmp_path / "t.zarr")  # raised DamagedStoreError before
    assert ds.sizes["token"] == 9 and ds["token_text"].shape == (4, 9)
    assert list(ds["token_text"].values[0, :4]) == ["t0", "t1", "t2", "t3"]
    assert list(ds["token_text"].values[2]) == [f"t{i}" for i in range(9)]
