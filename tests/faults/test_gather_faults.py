"""Gathered chunks (core/gather.py) under faults: SIGKILL at random and at chosen moments, a
full disk (a real tmpfs), damaged chunk files. The guarantee held (docs/guarantees.md): the
store opens at its last commit with every committed row bit for bit, `verify` passes, an append
continues it, and a kill loses at most the batches of the last two groups (2G - 1 batches
before the one in flight, G batches a gathered chunk)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import layerscope
from layerscope.core import ChunkError, StoreError

GROUP = 4  # batches per gathered chunk
SIZE = 4  # samples per batch
NAMES = tuple(f"v{i}" for i in range(6))

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    import layerscope.core.chunkfile as chunkfile
    import layerscope.core.chunkwrite as chunkwrite
    import layerscope.core.store as store
    import layerscope.core.committing as committing
    from layerscope.core import Selection, StoreOptions, WriterError
    from layerscope.core.format import new_group_attrs
    from layerscope.core.gather import GatherPolicy
    from layerscope.core.recorder import Recorder
    from layerscope.core.writer import TraceWriter

    sys.path.insert(0, sys.argv[7])
    from test_gather_faults import GROUP, NAMES, batch
    from _kill import killing

    path, mode, first, count, kill_at, width = sys.argv[1:7]
    first, count, width = int(first), int(count), int(width)
    kill_at, _, nth = kill_at.partition(":")

    if kill_at == "flush":  # while a gathered chunk is written
        killing(chunkwrite.ChunkWriter, "write", int(nth))
    elif kill_at == "replace":  # the rename of a rewritten chunk that holds committed rows
        killing(chunkfile.os, "replace", int(nth))
    elif kill_at == "rewrite":  # a rewritten chunk in place, before its batch commits
        killing(chunkfile.ChunkFiles, "replace", int(nth))
    elif kill_at == "publish":
        killing(committing, "publish", int(nth))

    options = StoreOptions(mode=mode, gathering=GatherPolicy(min_variables=1, batches=GROUP))
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = store.open_group_for_writing(path, mode, attrs)
    recorder = Recorder(TraceWriter(group, options, int(existing.get("committed_samples", 0)),
                                    int(existing.get("committed_batches", 0))),
                        Selection(), "numpy")
    print("ready", flush=True)
    try:
        for number in range(first, first + count):
            recorder.begin_pass(len(batch(number, NAMES[0], width)))
            for name in NAMES:
                recorder.put(name, "output", batch(number, name, width),
                             ("batch", "token", "hidden"))
            recorder.end_pass()
            print("ended", number, flush=True)
            time.sleep(0.002)  # the model's own time
        recorder.close()
    except WriterError as exc:
        print("error", str(exc).replace(chr(10), " "), flush=True)
""")


def batch(number, name, width=8):
    """Batch ``number`` of variable ``name``: samples of its own, every 3rd batch smaller."""
    size = SIZE - 1 if number % 3 == 2 else SIZE
    seed = number * 1000 + NAMES.index(name)
    return np.random.default_rng(seed).standard_normal((size, 6, width), np.float32)


def expected(name, batches, width=8):
    return np.concatenate([batch(n, name, width) for n in range(batches)])


def run(tmp_path, path, mode, first, count, kill_at="", width=8, kill_after=None):
    """The child's printed lines, its return code and its stderr."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, "-P", str(script), str(path), mode, str(first),
                              str(count), kill_at, str(width), here],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=120)
    return out.splitlines(), child.returncode, err


def rows_of(batches):
    """The samples of the first ``batches`` batches."""
    return sum(SIZE - 1 if number % 3 == 2 else SIZE for number in range(batches))


def lost_at_most(committed, done):
    """The guarantee for batches of varying size: when end_pass returns, every row before the
    last batch that ends by the group before the last one closed is committed, so the rows lost
    are fewer than two gathered chunks' and one batch's (2G - 1 batches where every batch has
    the first one's size)."""
    chunk = GROUP * SIZE
    return rows_of(done) - rows_of(committed or 0) <= 2 * chunk + SIZE - 2


def ended(lines):
    """How many batches the child saw end_pass return for."""
    numbers = [line.split()[1] for line in lines if line.startswith("ended ")]
    return max((int(n) + 1 for n in numbers if n.isdigit()), default=0)


def check(path, width=8):
    """The store opens; its committed rows are the ones given, bit for bit; verify passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = layerscope.open_trace(path)
        except StoreError as exc:
            assert "\n" not in str(exc)
            return None
    batches = int(ds.attrs["committed_batches"])
    for name in NAMES:
        if batches:
            got = ds[f"{name}@output"].values
            assert got.tobytes() == expected(name, batches, width).tobytes(), name
    report = layerscope.verify(path)
    assert report.ok, report.faults + report.problems
    return batches


def append_and_check(tmp_path, path, width=8):
    """An append after the fault continues the store from its last commit."""
    committed = check(path, width) or 0
    lines, code, err = run(tmp_path, path, "a" if committed else "w", committed, 5, width=width)
    assert code == 0, err
    assert check(path, width) == committed + 5


def test_a_kill_at_random_moments_loses_at_most_two_groups(tmp_path):
    rng = random.Random(17)
    seen = []
    for trial in range(4):
        path = tmp_path / f"t{trial}.zarr"
        lines, code, _ = run(tmp_path, path, "w-", 0, 2000, kill_after=rng.uniform(0.05, 1.0))
        assert code == -signal.SIGKILL, lines[-3:]
        committed = check(path)
        done = ended(lines)
        assert lost_at_most(committed, done), (committed, done)
        seen.append((committed, done))
        append_and_check(tmp_path, path)
    assert any(done > 2 * GROUP for _, done in seen), seen  # the kills landed mid-stream


@pytest.mark.parametrize("kill_at", ["flush:3", "flush:13", "publish:2", "publish:4"])
def test_a_kill_while_gathered_chunks_are_written_or_committed(tmp_path, kill_at):
    path = tmp_path / "t.zarr"
    lines, code, err = run(tmp_path, path, "w-", 0, 12, kill_at)
    assert code == -signal.SIGKILL, err
    append_and_check(tmp_path, path)


@pytest.mark.parametrize("kill_at", ["replace:1", "rewrite:2", "publish:2"])
def test_a_kill_while_an_append_rewrites_the_last_chunk(tmp_path, kill_at):
    """The last chunk of the store holds committed rows (6 batches, 4 a chunk): the append
    writes it again, whole, as a new file renamed over it, before its batches commit."""
    path = tmp_path / "t.zarr"
    _, code, err = run(tmp_path, path, "w-", 0, 6)
    assert code == 0, err
    _, code, err = run(tmp_path, path, "a", 6, 4, kill_at)
    assert code == -signal.SIGKILL, err
    assert check(path) == 6  # none of the append's batches committed, the old rows intact
    append_and_check(tmp_path, path)


@pytest.fixture()
def tmpfs(tmp_path):
    from ..tmpfs import mounted_tmpfs  # here: a child process imports this file as a script

    with mounted_tmpfs(tmp_path / "tmpfs", "20m") as folder:
        yield folder


def test_a_full_disk_while_gathered_chunks_are_written(tmp_path, tmpfs):
    """A real 20 MB tmpfs fills up during a flush: the writer's error reaches the caller at
    its next call, the store keeps its committed groups."""
    path = tmpfs / "t.zarr"
    width = 256  # 6 variables of 4 x 6 x 256: 150 KB a batch, 600 KB a group
    lines, code, err = run(tmp_path, path, "w-", 0, 400, width=width)
    assert code == 0, err
    errors = [line for line in lines if line.startswith("error")]
    assert errors, "the tmpfs never filled up"
    assert "No space left on device" in errors[0] and str(path) in errors[0], errors[0]
    committed = check(path, width)
    assert committed is not None and lost_at_most(committed, ended(lines))
    for leftover in path.rglob(".c.*"):  # a rename that never happened: nothing to read
        leftover.unlink()


def test_damaged_gathered_chunks_are_named(tmp_path):
    path = tmp_path / "t.zarr"
    _, code, err = run(tmp_path, path, "w-", 0, 10)
    assert code == 0, err
    files = sorted((path / "v1@output").glob("c.*"))
    assert [f.name for f in files] == ["c.0.0.0", "c.1.0.0", "c.2.0.0"]
    data = bytearray(files[1].read_bytes())
    data[len(data) // 3] ^= 0x40
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(files[2].read_bytes()[:-100])
    os.unlink(path / "v2@output" / "c.0.0.0")
    ds = layerscope.open_trace(path)
    with pytest.raises(ChunkError, match=r"v1@output/c\.[12]\.0\.0"):
        ds["v1@output"].load()
    np.testing.assert_array_equal(ds["v0@output"].values, expected("v0", 10))
    faults = {fault.key: fault.problem for fault in layerscope.verify(path).faults}
    assert set(faults) == {"v1@output/c.1.0.0", "v1@output/c.2.0.0", "v2@output/c.0.0.0"}
    assert "missing" in faults["v2@output/c.0.0.0"]
    manifests = sorted((path / "_layerscope" / "chunks").glob("b*.json"))
    listed = [key for m in manifests for key in json.loads(m.read_text())["chunks"]]
    assert "v1@output/c.1.0.0" in listed  # written once for its group, listed once
    assert listed.count("v1@output/c.1.0.0") == 1
