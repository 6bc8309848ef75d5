"""Gathered small variables (core/gather.py): chunks of several batches, written whole,
committed in groups; values read back bit for bit whatever the batch sizes, token lengths,
dtypes, appends and stores."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import zarr

import layerscope
from layerscope.core import CaptureError, WriterError, _zarr_compat
from layerscope.core.gather import GatherPolicy

from .test_writer import make_recorder

#: every small variable gathered, 4 batches a chunk
GATHER = GatherPolicy(min_variables=1, batches=4)
NAMES = ("a", "b", "c")


def snapshot(value, alloc):
    """As the torch backend's: copy into the writer's memory."""
    host = alloc(value.shape, value.dtype)
    host[...] = value
    return host


class DeviceCopy:
    """What a device snapshot returns: host data a writer thread waits for."""

    def __init__(self, value):
        self.value = value.copy()
        self.shape, self.nbytes = value.shape, value.nbytes


def device_snapshot(value, alloc):
    return DeviceCopy(value)


def device_to_numpy(held):
    return held.value if isinstance(held, DeviceCopy) else np.asarray(held)


def write(path, sizes, mode="w-", start=0, way="direct", gathering=GATHER, store=None,
          tokens=None, close=True, **options):
    """Batches of ``sizes`` samples of three variables; returns what each was given."""
    recorder = make_recorder(store if store is not None else path, mode,
                             gathering=gathering, **options)
    given: dict[str, list[np.ndarray]] = {name: [] for name in NAMES}
    for number, size in enumerate(sizes, start):
        rng = np.random.default_rng(number)
        length = tokens[number - start] if tokens else 5
        recorder.begin_pass(size)
        for name in NAMES:
            data = rng.standard_normal((size, length, 8), np.float32)
            given[name].append(data)
            kwargs = {"direct": {"snapshot": snapshot},
                      "device": {"snapshot": device_snapshot, "to_numpy": device_to_numpy},
                      "numpy": {}}[way]
            recorder.put(name, "output", data, ("batch", "token", "hidden"), **kwargs)
        recorder.end_pass()
    if close:
        recorder.close()
    return given, recorder


def expected(*given, length=None):
    out = {}
    for name in NAMES:
        parts = [part for one in given for part in one[name]]
        width = length or max(p.shape[1] for p in parts)
        padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=np.nan)
                  for p in parts]
        out[name] = np.concatenate(padded)
    return out


def check(path, want, batches):
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == batches
    for name, values in want.items():
        got = ds[f"{name}@output"].values
        assert got.tobytes() == values.tobytes(), name
    assert layerscope.verify(path).ok
    return ds


def chunk_rows(path, name):
    doc = json.loads((path / name / "zarr.json").read_text())
    return doc["chunk_grid"]["configuration"]["chunk_shape"][0]


@pytest.mark.parametrize("way", ["direct", "device", "numpy"])
def test_gathered_variables_read_back_exactly(tmp_path, way):
    path = tmp_path / "t.zarr"
    given, _ = write(path, [4] * 10, way=way)
    check(path, expected(given), 10)
    assert chunk_rows(path, "a@output") == 16  # four batches of four samples
    files = sorted(f for f in os.listdir(path / "a@output") if f.startswith("c."))
    assert files == ["c.0.0.0", "c.1.0.0", "c.2.0.0"]  # 10 batches: 3 chunks, the last part-full
    np.testing.assert_array_equal(zarr.open_array(path / "a@output", mode="r")[:],
                                  expected(given)["a"])


def test_batches_across_chunk_ends(tmp_path):
    """Batches of other sizes than the first cross the ends of the chunks (16 rows)."""
    path = tmp_path / "t.zarr"
    sizes = [4, 3, 5, 7, 1, 4, 9, 2]
    given, _ = write(path, sizes)
    check(path, expected(given), len(sizes))


def test_growing_and_shrinking_token_axes(tmp_path):
    path = tmp_path / "t.zarr"
    tokens = [5, 5, 9, 3, 17, 2, 33, 12]
    given, _ = write(path, [4] * len(tokens), tokens=tokens)
    check(path, expected(given), len(tokens))


@pytest.mark.parametrize("first", [4, 6, 8])
def test_appends_continue_the_last_chunk(tmp_path, first):
    """The last chunk holds committed rows: an append fills it on (rewritten whole)."""
    path = tmp_path / "t.zarr"
    one, _ = write(path, [4] * first)
    two, _ = write(path, [4, 2, 4, 4, 3], mode="a", start=first)
    check(path, expected(one, two), first + 5)
    three, _ = write(path, [4], mode="a", start=first + 5)
    check(path, expected(one, two, three), first + 6)


def test_a_variable_skipped_in_some_batches_reads_fill_values_there(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GATHER)
    want = []
    for number in range(6):
        data = np.full((4, 3), number, np.float32)
        recorder.begin_pass(4)
        recorder.put("always", "output", data, ("batch", "hidden"), snapshot=snapshot)
        if number % 2:
            recorder.put("odd", "output", data, ("batch", "hidden"), snapshot=snapshot)
        recorder.end_pass()
        want.append(data if number % 2 else np.full((4, 3), np.nan, np.float32))
    recorder.close()
    ds = layerscope.open_trace(path)
    assert ds["odd@output"].values.tobytes() == np.concatenate(want).tobytes()


def test_a_discarded_batch_leaves_nothing_behind(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GATHER)
    kept = []
    for number in range(5):
        data = np.full((4, 3), number, np.float32)
        recorder.begin_pass(4)
        recorder.put("x", "output", data, ("batch", "hidden"), snapshot=snapshot)
        if number == 2:
            recorder.abort_pass()
            continue
        recorder.end_pass()
        kept.append(data)
    recorder.close()
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 4
    np.testing.assert_array_equal(ds["x@output"].values, np.concatenate(kept))


def test_commits_wait_for_the_group(tmp_path):
    """A batch is committed once the chunks holding its rows are written: in groups."""
    path = tmp_path / "t.zarr"
    _, recorder = write(path, [4] * 10, close=False)
    # when end_pass returns, the group before the last one closed is committed: batches 1-4
    assert recorder.writer.committed[0] >= 4
    deadline = time.monotonic() + 5
    while recorder.writer.committed[0] < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert recorder.writer.committed[0] == 8  # batches 9 and 10 wait in memory
    with pytest.warns(UserWarning, match="writing"):
        assert layerscope.open_trace(path).attrs["committed_batches"] == 8
    recorder.close()
    assert layerscope.open_trace(path).attrs["committed_batches"] == 10


def test_few_small_variables_are_not_gathered(tmp_path):
    path = tmp_path / "t.zarr"
    given, _ = write(path, [4] * 3, gathering=GatherPolicy())  # 4 small ones < 32
    check(path, expected(given), 3)
    assert chunk_rows(path, "a@output") == 4


def test_the_memory_for_gathered_chunks_sets_the_batches_per_chunk(tmp_path):
    per_batch = 3 * 4 * 5 * 8 * 4 + 4 * 8  # three variables and the batch coordinate
    policy = GatherPolicy(min_variables=1, batches=64, memory=2 * 3 * per_batch)
    path = tmp_path / "t.zarr"
    given, _ = write(path, [4] * 7, gathering=policy)
    check(path, expected(given), 7)
    assert chunk_rows(path, "a@output") == 3 * 4


def test_a_dtype_change_is_a_writer_error(tmp_path):
    recorder = make_recorder(tmp_path / "t.zarr", gathering=GATHER)
    recorder.begin_pass(2)
    recorder.put("x", "output", np.zeros((2, 3), np.float32), ("batch", "hidden"))
    recorder.end_pass()
    recorder.begin_pass(2)
    with pytest.raises((WriterError, CaptureError)):
        recorder.put("x", "output", np.zeros((2, 3), np.float64), ("batch", "hidden"))
        recorder.end_pass()
        recorder.close()


def test_downcast_applies_to_gathered_chunks(tmp_path):
    path = tmp_path / "t.zarr"
    given, _ = write(path, [4] * 5, downcast="float16")
    ds = layerscope.open_trace(path)
    assert ds["a@output"].dtype == np.float16
    np.testing.assert_array_equal(ds["a@output"].values,
                                  expected(given)["a"].astype(np.float16))


@pytest.mark.parametrize("private", [True, False], ids=["fast", "public"])
def test_a_store_without_local_files_and_the_public_fallback(tmp_path, monkeypatch, private):
    monkeypatch.setattr(_zarr_compat, "PRIVATE_API", private)
    store = zarr.storage.MemoryStore()
    given, _ = write(None, [4, 4, 3, 4, 4, 4], store=store)
    ds = layerscope.open_trace(store)
    for name, values in expected(given).items():
        np.testing.assert_array_equal(ds[f"{name}@output"].values, values)
    path = tmp_path / "t.zarr"
    given, _ = write(path, [4, 4, 3, 4, 4, 4])
    more, _ = write(path, [4, 4], mode="a", start=6)
    check(path, expected(given, more), 8)


def test_the_close_writes_every_array_document_with_the_committed_rows(tmp_path):
    path = tmp_path / "t.zarr"
    write(path, [4] * 5)
    for name in NAMES:
        assert zarr.open_array(path / f"{name}@output", mode="r").shape == (20, 5, 8)


def test_a_gathered_variable_then_written_in_pieces(tmp_path):
    """A variable gathered so far, then written in pieces (a traced generate()): its open
    chunk is written at once and its pieces land where they belong."""
    from layerscope.core.region import Region

    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GATHER)
    writer = recorder.writer
    want = []
    for number in range(7):
        data = np.random.default_rng(number).standard_normal((4, 5, 8), np.float32)
        want.append(data)
        recorder.begin_pass(4)
        if number < 5:
            writer.put("x", data, ("batch", "token", "hidden"), {}, snapshot=snapshot)
        else:
            for start, stop in ((0, 3), (3, 5)):
                writer.put("x", np.ascontiguousarray(data[:, start:stop]),
                           ("batch", "token", "hidden"), {},
                           region=Region((5, 8), (start, 0)))
        recorder.end_pass()
    recorder.close()
    ds = layerscope.open_trace(path)
    assert ds["x"].values.tobytes() == np.concatenate(want).tobytes()
    assert layerscope.verify(path).ok


def test_compression_is_decided_on_the_first_batch_as_for_any_variable(tmp_path):
    """A gathered chunk of one batch repeated (the same input every pass) shrinks under any
    compressor; whether a variable is compressed is still decided on its first batch alone,
    as for every other variable (random floats: stored as they are)."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GatherPolicy(min_variables=1, batches=10))
    data = np.random.default_rng(0).standard_normal((4, 16, 64), np.float32)
    zeros = np.zeros_like(data)
    for _ in range(10):  # ten copies of 16 KB: LZ4 finds the repeats
        recorder.begin_pass(4)
        recorder.put("noise", "output", data, ("batch", "token", "hidden"))
        recorder.put("zeros", "output", zeros, ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()
    codecs = {name: [c["name"] for c in json.loads((path / name / "zarr.json").read_text())
                     ["codecs"]] for name in ("noise@output", "zeros@output")}
    assert chunk_rows(path, "noise@output") == 40  # gathered: 10 batches a chunk
    assert "blosc" not in codecs["noise@output"]
    assert "blosc" in codecs["zeros@output"]
    ds = layerscope.open_trace(path)
    assert ds["noise@output"].values.tobytes() == np.concatenate([data] * 10).tobytes()


@pytest.mark.parametrize(("batches", "by_process"), [(1, False), (5, False), (5, True)],
                         ids=["created-at-close", "threads", "process"])
def test_the_written_rows_past_the_last_batch_hold_fill_values(tmp_path, monkeypatch,
                                                               batches, by_process):
    """The page that ends a part-used chunk's rows holds fill values past them, not what
    its memory held before; only the rows past that page are left unfilled (a hole). In a
    one-batch trace the array is created only once its chunk is filled, at the close."""
    from layerscope.core import gatherwrite

    monkeypatch.setattr(gatherwrite, "PROCESS_FROM", 1 if by_process else 10**9)
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GATHER, chunk_process=by_process)
    rng = np.random.default_rng(0)
    for _ in range(batches):  # 5: a second group (the process's, where asked) of one batch
        data = rng.standard_normal((4, 100), np.float32)  # 400-byte rows, incompressible
        recorder.begin_pass(4)
        recorder.put("kept", "output", data, ("batch", "hidden"), snapshot=snapshot)
        recorder.end_pass()
    recorder.close()
    last = f"c.{(batches - 1) // 4}.0"
    body = np.fromfile(path / "kept@output" / last, np.float32)[:-1]  # less its crc32c
    assert body.size == 16 * 100
    written, hole = body[:1024], body[1024:]  # one page written: 4 rows, 6.24 past them
    assert written[:400].tobytes() == data.tobytes()
    assert np.isnan(written[400:]).all(), "rows past the used ones hold old memory"
    assert (hole == 0).all()
    assert layerscope.verify(path).ok


@pytest.mark.parametrize(("batches", "holes"), [(9, True), (8, False)])
def test_info_says_what_the_holes_leave_on_the_disk(tmp_path, batches, holes):
    """``layerscope info`` gives the files' lengths as stored and, where the rows past the
    last batch leave holes in the last chunks, the disk they take beside it: each
    variable's blocks, as the file system counts them."""
    from layerscope.core.info import format_summary, summarize

    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GATHER)
    rng = np.random.default_rng(0)
    for _ in range(batches):  # chunks of 4 batches: 9 leave three quarters of the third
        recorder.begin_pass(4)
        recorder.put("kept", "output", rng.standard_normal((4, 1024), np.float32),
                     ("batch", "hidden"), snapshot=snapshot)
        recorder.end_pass()
    recorder.close()
    summary = summarize(path)
    (var,) = summary.variables
    files = [f for f in (path / "kept@output").iterdir()]
    assert var.stored_bytes == sum(f.stat().st_size for f in files)
    assert var.disk_bytes == sum(f.stat().st_blocks * 512 for f in files)
    line = format_summary(summary).splitlines()[5]
    assert line.startswith("size ")
    if holes:
        assert var.disk_bytes < 0.9 * var.stored_bytes
        assert "on disk" in line
    else:
        assert "on disk" not in line


@pytest.mark.parametrize("by_process", [False, True], ids=["threads", "process"])
def test_the_rows_past_the_last_batch_are_a_hole_in_the_last_chunk(tmp_path, monkeypatch,
                                                                   by_process):
    """A trace that ends inside its gathered chunks writes only the pages of the rows it
    used: the rest of each file is a hole (zeros nobody wrote), the checksum covers it,
    and an append that skips a variable reads fill values there, not the hole's zeros."""
    from layerscope.core import chunkproc, gatherwrite

    monkeypatch.setattr(gatherwrite, "PROCESS_FROM", 1 if by_process else 10**9)
    holes: list[tuple[str, int]] = []  # each chunk sent to the process: its kind, its hole
    send = chunkproc.ChunkProcess.send

    def spied(self, jobs):
        holes.extend((kind, length - body.nbytes) for _, body, length, _, kind in jobs
                     if kind in (chunkproc.CHUNK, chunkproc.CACHED_CHUNK))
        return send(self, jobs)

    monkeypatch.setattr(chunkproc.ChunkProcess, "send", spied)
    path = tmp_path / "t.zarr"
    row = np.arange(1024, dtype=np.float32)  # 4 KiB: a batch of 4 rows is 16 KiB
    recorder = make_recorder(path, gathering=GATHER, chunk_process=by_process)
    given = []
    for number in range(10):  # chunks of 4 batches (16 rows): the third holds 2 of them
        data = row + np.arange(number * 4, number * 4 + 4, dtype=np.float32)[:, None]
        recorder.begin_pass(4)
        for name in ("kept", "skipped"):
            recorder.put(name, "output", data, ("batch", "hidden"), snapshot=snapshot)
        recorder.end_pass()
        given.append(data)
    recorder.close()
    # the process writes every group (the first with its arrays' zarr.json); the last, at
    # the close (through the page cache): two 16-row chunks of 8 rows and the batch
    # coordinate's (128 bytes: no hole)
    assert {hole for _, hole in holes} <= {0, 8 * 4096}
    at_close = [hole for kind, hole in holes if kind == chunkproc.CACHED_CHUNK]
    assert at_close.count(8 * 4096) == (2 if by_process else 0)
    assert 8 * 4096 not in {hole for kind, hole in holes if kind == chunkproc.CHUNK}
    full = 16 * 4096
    last = path / "kept@output" / "c.2.0"
    assert last.stat().st_size == full + 4  # zarr's chunk: the whole chunk, its crc32c
    assert last.stat().st_blocks * 512 <= full // 2 + 4096, "the unused rows were written"
    assert (path / "kept@output" / "c.0.0").stat().st_blocks * 512 >= full
    assert layerscope.verify(path).ok
    ds = layerscope.open_trace(path)
    for name in ("kept", "skipped"):
        assert ds[f"{name}@output"].values.tobytes() == np.concatenate(given).tobytes()

    recorder = make_recorder(path, "a", gathering=GATHER, chunk_process=by_process)
    recorder.begin_pass(4)
    recorder.put("kept", "output", np.tile(row + 99, (4, 1)), ("batch", "hidden"),
                 snapshot=snapshot)
    recorder.end_pass()
    recorder.close()
    assert layerscope.verify(path).ok
    ds = layerscope.open_trace(path)
    np.testing.assert_array_equal(ds["kept@output"].values,
                                  np.concatenate([*given, np.tile(row + 99, (4, 1))]))
    skipped = ds["skipped@output"].values
    assert skipped[:40].tobytes() == np.concatenate(given).tobytes()
    assert np.isnan(skipped[40:]).all()  # fill values, not the hole's zeros


def test_gathered_variables_beside_others_read_in_chunks_of_one_batch(tmp_path):
    """A store that gathers some variables and not others: open_trace gives the gathered ones
    dask chunks of one batch, as the others have, so that a variable and its coordinates
    agree; a store that gathers every variable keeps its chunks of several batches."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GatherPolicy(min_variables=1, batches=4,
                                                          below=1 << 10))
    rng = np.random.default_rng(0)
    small, large = [], []
    for _ in range(6):
        recorder.begin_pass(2)
        small.append(rng.standard_normal((2, 4, 8), np.float32))  # 256 bytes: gathered
        large.append(rng.standard_normal((2, 64, 8), np.float32))  # 4 KB: a chunk a batch
        recorder.put("small", "output", small[-1], ("batch", "token", "hidden"))
        recorder.put("large", "output", large[-1], ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()
    assert chunk_rows(path, "small@output") == 8 and chunk_rows(path, "large@output") == 2
    ds = layerscope.open_trace(path)
    assert ds["small@output"].chunks[0] == (2,) * 6 == ds["large@output"].chunks[0]
    assert ds["small@output"].values.tobytes() == np.concatenate(small).tobytes()
    assert ds["large@output"].values.tobytes() == np.concatenate(large).tobytes()
    assert ds.chunks["batch"] == (2,) * 6  # every variable agrees
    given, _ = write(tmp_path / "all.zarr", [2] * 6)
    assert layerscope.open_trace(tmp_path / "all.zarr")["a@output"].chunks[0] == (8, 4)


@pytest.mark.parametrize("variables", [3, 80])  # 80: written by the chunk process
def test_a_group_is_committed_and_published_once(tmp_path, monkeypatch, variables):
    """A group's batches, its last one included, are committed together once its chunks
    are written: one root document for the group (each rewrites every array's entry; at
    1,601 arrays 11 ms of the writer's Python, Python's lock held), none for the batches
    before its last alone."""
    from layerscope.core import committing

    published: list[int] = []
    write_root = committing.Commits.write_root

    def counted(self):
        published.append(self.published)
        return write_root(self)

    monkeypatch.setattr(committing.Commits, "write_root", counted)
    names = [f"v{i}" for i in range(variables)]
    monkeypatch.setattr(sys.modules[__name__], "NAMES", tuple(names))
    path = tmp_path / "t.zarr"
    given, recorder = write(path, [4] * 10, close=False)
    deadline = time.monotonic() + 10
    while recorder.writer.committed[0] < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # none at 3 or 7 (a group written before the one after it is done publishes alone)
    assert published[-1] == 8 and all(n % 4 == 0 for n in published), published
    recorder.close()
    check(path, expected(given), 10)
