"""Writer failures at every step surface in the caller as a WriterError naming the step and
the path, within seconds, never a hang; the store ends ``aborted`` with its committed batches
intact (issue 14, item 1)."""

from __future__ import annotations

import errno
import threading
import time
import warnings

import numpy as np
import pytest

import layerscope
import layerscope.core.chunkfile as chunkfile
import layerscope.core.committing as committing
import layerscope.core.writer as writer_module
from layerscope.core import WriterError

from ..core.test_writer import make_recorder

HANG = 10.0  # seconds: past this, a call that should have failed counts as a hang


def batch_data(number, size):
    return np.random.default_rng(number).standard_normal((size, 6, 8), np.float32)


def capture(path, sizes, put, mode="w-", **options):
    """Write one batch per entry of ``sizes``, adding the data of every batch put to ``put``."""
    recorder = make_recorder(path, mode, **options)
    try:
        for number, size in enumerate(sizes):
            data = batch_data(number, size)
            recorder.begin_pass(size)
            recorder.put("layer.0", "output", data, ("batch", "token", "hidden"), "Block")
            recorder.put("layer.1", "output", data * 2, ("batch", "token", "hidden"), "Block")
            put.append(data)
            recorder.end_pass()
    except BaseException:
        recorder.close(failed=True)
        raise
    recorder.close()


def within(seconds, fn):
    """Run ``fn`` in a thread; its error or value, failing the test if it hangs."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"hang: still running after {seconds} s"
    return outcome, time.monotonic() - start


def check_intact(path, put, status="aborted"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == status
    rows = ds.attrs["committed_samples"]
    expected = np.concatenate(put)[:rows] if put else np.zeros((0, 6, 8), np.float32)
    assert sum(len(p) for p in put[: ds.attrs["committed_batches"]]) == rows
    if not rows:
        return rows  # nothing committed, no variable written yet
    np.testing.assert_array_equal(ds["layer.0@output"].values, expected)
    np.testing.assert_array_equal(ds["layer.1@output"].values, expected * 2)
    return rows


def failing_at(count, persistent=False):
    """A replacement that fails at its ``count``-th call (1-based), and after it if
    ``persistent`` (a full disk stays full)."""
    calls = [0]

    def maybe_fail(original):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == count or (persistent and calls[0] > count):
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return original(*args, **kwargs)
        return wrapped
    maybe_fail.calls = calls  # type: ignore[attr-defined]
    return maybe_fail


STEPS = {
    # step named in the error -> (object, attribute) a failure is injected into
    "chunk write": (chunkfile.ChunkFiles, "write"),
    "commit": (committing, "publish"),
    "close": (writer_module, "save_array_documents"),
    "manifest write": (committing, "write_manifest"),
    "array creation": (writer_module, "create_array"),
}


@pytest.mark.parametrize(("step", "count", "persistent"), [
    ("chunk write", 5, True), ("chunk write", 1, False), ("commit", 3, False),
    ("commit", 1, False), ("commit", 2, True), ("close", 1, False), ("array creation", 2, False),
    ("manifest write", 2, False), ("manifest write", 1, True),
])
def test_a_failure_at_each_step_is_a_writer_error_and_the_store_is_aborted(
        tmp_path, monkeypatch, step, count, persistent):
    owner, name = STEPS[step]
    failing = failing_at(count, persistent)
    monkeypatch.setattr(owner, name, failing(getattr(owner, name)))
    path = tmp_path / "t.zarr"
    put: list = []

    def run():
        capture(path, [4] * 6, put)

    outcome, _ = within(HANG, run)
    error = outcome.get("error")
    assert isinstance(error, WriterError), outcome
    assert step in str(error) and str(path) in str(error)
    monkeypatch.undo()
    # a full disk stays full: even the status cannot be written, the store says "writing";
    # so does a store whose writer failed to start (the first commit)
    # (commits merge when the writer lags: the failing call may be the status write itself)
    stuck = step == "commit" and (persistent or count == 1 or failing.calls[0] == count)
    check_intact(path, put, "writing" if stuck else "aborted")


def test_a_failure_in_zarr_own_writes_of_partial_chunks(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    original = LocalStore.set
    calls = [0]

    async def failing_set(self, key, value):
        if "/c." in key:
            calls[0] += 1
            if calls[0] > 4:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    path = tmp_path / "t.zarr"
    put: list = []
    outcome, _ = within(HANG, lambda: capture(path, [4, 3, 4, 3, 4, 3, 4], put))
    assert isinstance(outcome.get("error"), WriterError), outcome
    assert "chunk write" in str(outcome["error"])
    monkeypatch.undo()
    check_intact(path, put)


def test_a_caller_waiting_for_room_is_let_through_when_the_writer_fails(tmp_path, monkeypatch):
    """The model thread blocks in the host pool while the disk is slow; a failure then must
    reach it quickly (it used to wait for ever when the commit failed)."""
    original = chunkfile.ChunkFiles.write
    calls = [0]

    def slow_then_failing(self, key, body, trailer):
        calls[0] += 1
        time.sleep(0.05)
        if calls[0] > 6:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original(self, key, body, trailer)

    monkeypatch.setattr(chunkfile.ChunkFiles, "write", slow_then_failing)
    path = tmp_path / "t.zarr"
    put: list = []
    outcome, elapsed = within(HANG, lambda: capture(
        path, [4] * 40, put, max_pending_bytes=1000))
    assert isinstance(outcome.get("error"), WriterError), outcome
    assert elapsed < 5
    monkeypatch.undo()
    check_intact(path, put)
