"""Crash safety while token axes grow (passes of different lengths, core/growth.py).

A writer is SIGKILLed as a longer pass grows the arrays, while it writes the grown chunks,
and while it publishes the commit that carries the grown shape; or its disk fills up
during growth. Each time the store opens at its last commit, every committed batch reads
back bit for bit within its own length and as fill values past it, the checksummed reader
and ``layerscope.verify`` accept it, and an append grows it further.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import layerscope

#: each batch's token length: grows, shrinks, grows again
LENGTHS = (5, 5, 9, 3, 17, 17, 2, 33, 12, 40)
WIDTH = 256  # a random batch's chunk is more than the file size limit below

CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import layerscope.core.chunkwrite as chunkwrite
    import layerscope.core.store as store
    import layerscope.core.committing as committing
    import layerscope.core.writer as writer_module
    from layerscope.core import Selection, StoreOptions
    from layerscope.core.format import new_group_attrs
    from layerscope.core.recorder import Recorder
    from layerscope.core.region import Region
    from layerscope.core.writer import TraceWriter

    sys.path.insert(0, sys.argv[7])
    from test_growth_faults import batch
    from _kill import killing

    path, mode, tag, first, count, kill_at = sys.argv[1:7]
    tag, first, count = int(tag), int(first), int(count)
    kill_at, _, nth = kill_at.partition(":")

    if kill_at == "grow":  # as a longer pass grows every array with the token axis
        killing(writer_module, "grow_axis", int(nth))
    elif kill_at == "chunks":  # while the chunks of grown arrays are written
        killing(chunkwrite.ChunkWriter, "write", int(nth))
    elif kill_at == "publish":  # while a commit with the grown shape is published
        killing(committing, "publish", int(nth))
    elif kill_at == "pieces":  # while zarr writes a piece of a batch (see below)
        import zarr
        killing(zarr.Array, "__setitem__", int(nth))
    pieces = int(os.environ.get("PIECES", "0"))

    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = store.open_group_for_writing(path, mode, attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode=mode, workers=2),
                                    int(existing.get("committed_samples", 0)),
                                    int(existing.get("committed_batches", 0))),
                        Selection(), "numpy")
    try:
        for number in range(first, first + count):
            ids, mask, hidden = batch(tag, number)
            recorder.begin_pass(len(ids), token_ids=ids, attention_mask=mask)
            attention = hidden[:, None, :, :1] * hidden[:, None, None, :, 0]
            if pieces:  # as a traced generate() writes: a few positions at a time
                length = hidden.shape[1]
                for at in range(0, length, pieces):
                    cut = slice(at, at + pieces)
                    recorder.put("a", "output", hidden[:, cut], ("batch", "token", "hidden"),
                                 region=Region((length, hidden.shape[2]), (at, 0),
                                               {0: pieces}), call_index=0)
                    recorder.put("b", "attention", attention[:, :, cut],
                                 ("batch", "head", "query", "key"),
                                 region=Region((1, length, length), (0, at, 0), {1: pieces}),
                                 call_index=0)
            else:
                recorder.put("a", "output", hidden, ("batch", "token", "hidden"))
                recorder.put("b", "attention", attention, ("batch", "head", "query", "key"))
            recorder.end_pass()
        recorder.close()
    except Exception as exc:  # a full disk: the writer's error
        print("error:", type(exc).__name__, exc, flush=True)
        try:
            recorder.close(failed=True)
        except Exception as closing:
            print("close:", type(closing).__name__, closing, flush=True)
        sys.exit(0)
""")


def batch(tag: int, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask (right padding: the last sample is shorter) and hidden
    states of batch ``number``; batches 0 and 1 are constant (they compress well)."""
    length = LENGTHS[number % len(LENGTHS)]
    size = 3 if number % 3 == 2 else 4
    rng = np.random.default_rng(1000 * tag + number)
    ids = rng.integers(0, 100, (size, length))
    mask = np.ones((size, length), dtype=np.int64)
    mask[-1, max(1, length // 2):] = 0
    if number < 2:
        hidden = np.full((size, length, WIDTH), float(number + 1), np.float32)
    else:
        hidden = rng.standard_normal((size, length, WIDTH), np.float32)
    return ids, mask, hidden


def run(tmp_path, path, mode, tag, first, count, kill_at="", limit=None, pieces=0):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    here = os.path.dirname(os.path.abspath(__file__))

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    done = subprocess.run(
        [sys.executable, "-P", str(script), str(path), mode, str(tag), str(first), str(count),
         kill_at, here],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PIECES": str(pieces)},
        preexec_fn=limited if limit is not None else None)
    return done.returncode, done.stdout + done.stderr


def check(path, runs):
    """The store opens; its committed rows are those of ``runs`` ((tag, first, count), in
    order of writing) as far as committed, each within its length, fill values past it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = layerscope.open_trace(path)
        rows = int(ds.attrs["committed_samples"])
        if "a@output" not in ds.data_vars:  # killed before the first commit of any array
            assert rows == 0
            return 0
        a, b = ds["a@output"].values, ds["b@attention"].values
        ids, mask = ds["token_id"].values, ds["token_mask"].values
    assert a.shape[0] == rows
    start = 0
    batches = [(tag, n) for tag, first, count in runs for n in range(first, first + count)]
    for tag, number in batches:
        want_ids, want_mask, want = batch(tag, number)
        size, length = want_ids.shape
        if start + size > rows:
            break
        here = slice(start, start + size)
        assert a[here, :length].tobytes() == want.tobytes(), (tag, number)
        assert np.isnan(a[here, length:]).all()
        attention = want[:, None, :, :1] * want[:, None, None, :, 0]
        np.testing.assert_array_equal(b[here, :, :length, :length], attention)
        assert np.isnan(b[here, :, length:]).all() and np.isnan(b[here, :, :, length:]).all()
        np.testing.assert_array_equal(ids[here, :length], want_ids)
        assert (ids[here, length:] == -1).all()
        np.testing.assert_array_equal(mask[here, :length], want_mask.astype(bool))
        assert not mask[here, length:].any()
        start += size
    assert start == rows, "committed rows past the batches written"
    report = layerscope.verify(path)
    assert report.ok, report
    return ds.attrs["committed_batches"]


@pytest.mark.parametrize("kill_at", ["grow:1", "grow:3", "chunks:1", "chunks:2", "publish:4",
                                     "publish:6"])
def test_a_kill_while_arrays_grow_leaves_the_last_commit(tmp_path, kill_at):
    path = tmp_path / "t.zarr"
    code, out = run(tmp_path, path, "w-", 1, 0, len(LENGTHS), kill_at)
    assert code == -signal.SIGKILL, out
    committed = check(path, [(1, 0, len(LENGTHS))])
    assert committed < len(LENGTHS)
    # an append after the crash grows the store further and keeps what was committed
    code, out = run(tmp_path, path, "a", 2, 5, 4)
    assert code == 0, out
    assert check(path, [(1, 0, committed), (2, 5, 4)]) == committed + 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        length = layerscope.open_trace(path).sizes["token"]
    longest = max(LENGTHS[n] for n in [*range(committed), *range(5, 9)])
    # the committed passes' longest; before any commit, arrays keep the length they were
    # created with
    assert length == longest if committed else longest <= length <= max(LENGTHS)


def test_a_full_disk_during_growth_keeps_the_committed_batches(tmp_path):
    """Batches 0 and 1 (constant, short) fit under the file size limit; the longer random
    batches that grow the arrays do not: the writer fails, the store keeps its commits."""
    path = tmp_path / "t.zarr"
    code, out = run(tmp_path, path, "w-", 1, 0, len(LENGTHS), limit=24 << 10)
    assert code == 0, out
    assert "WriterError" in out and "File too large" in out, out
    committed = check(path, [(1, 0, len(LENGTHS))])
    assert 2 <= committed < len(LENGTHS)
    code, out = run(tmp_path, path, "a", 3, 2, 3)
    assert code == 0, out
    check(path, [(1, 0, committed), (3, 2, 3)])


@pytest.mark.parametrize("kill_at", ["pieces:3", "pieces:20", "publish:3", "publish:7"])
def test_a_kill_while_a_batch_is_written_in_pieces_leaves_the_last_commit(tmp_path, kill_at):
    """Batches written a few positions at a time (core/region.py, as a traced generate()
    writes them): a kill leaves the last commit, and an append in pieces goes on from it."""
    path = tmp_path / "t.zarr"
    code, out = run(tmp_path, path, "w-", 1, 0, len(LENGTHS), kill_at, pieces=4)
    assert code == -signal.SIGKILL, out
    committed = check(path, [(1, 0, len(LENGTHS))])
    assert committed < len(LENGTHS)
    code, out = run(tmp_path, path, "a", 2, 5, 4, pieces=3)
    assert code == 0, out
    assert check(path, [(1, 0, committed), (2, 5, 4)]) == committed + 4


def test_a_full_disk_while_pieces_are_written_keeps_the_committed_batches(tmp_path):
    path = tmp_path / "t.zarr"
    code, out = run(tmp_path, path, "w-", 1, 0, len(LENGTHS), limit=10 << 10, pieces=4)
    assert code == 0, out
    assert "WriterError" in out, out
    committed = check(path, [(1, 0, len(LENGTHS))])
    assert committed < len(LENGTHS)
    code, out = run(tmp_path, path, "a", 3, 2, 3)
    assert code == 0, out
    check(path, [(1, 0, committed), (3, 2, 3)])
