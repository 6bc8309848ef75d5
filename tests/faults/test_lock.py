"""One writer per store: a second writer (thread or process) gets StoreLockedError naming
the holder; the lock of a dead writer is taken over (issue 14, item 4); no write follows a
symbolic link out of the store (item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from layerscope.core import Selection, StoreError, StoreLockedError, StoreOptions, WriterError
from layerscope.core.format import new_group_attrs
from layerscope.core.lock import LeaseLock
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter


def open_recorder(path, mode):
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = open_group_for_writing(path, mode, attrs)
    writer = TraceWriter(group, StoreOptions(mode=mode),
                         int(existing.get("committed_samples", 0)),
                         int(existing.get("committed_batches", 0)))
    return Recorder(writer, Selection(), "numpy")


def one_batch(recorder, size=4, seed=0):
    recorder.begin_pass(size)
    data = np.random.default_rng(seed).standard_normal((size, 6, 8), np.float32)
    recorder.put("a", "output", data, ("batch", "token", "hidden"))
    recorder.end_pass()


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    path = tmp_path / "t.zarr"
    first = open_recorder(path, "w-")
    one_batch(first)
    for mode in ("a", "w"):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            open_recorder(path, mode)
    first.close()
    second = open_recorder(path, "a")  # free again once the first closed
    one_batch(second)
    second.close()


HOLDER = textwrap.dedent("""
    import sys, time
    from layerscope.core import Selection
    from layerscope.core.format import new_group_attrs
    from layerscope.core.store import open_group_for_writing
    from layerscope.core.writer import TraceWriter
    from layerscope.core import StoreOptions
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, _ = open_group_for_writing(sys.argv[1], "w-", attrs)
    writer = TraceWriter(group, StoreOptions())
    print("held", flush=True)
    time.sleep(60)
""")


def test_another_process_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    path = tmp_path / "t.zarr"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    child = subprocess.Popen([sys.executable, "-P", str(script), str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
            open_recorder(path, "a")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    recorder = open_recorder(path, "a")  # the kernel let go of the dead writer's lock
    one_batch(recorder)
    recorder.close()


def test_lease_lock_on_a_store_without_files(tmp_path):
    store = zarr.storage.MemoryStore()
    first = LeaseLock(store)
    with pytest.raises(StoreLockedError, match="pid"):
        LeaseLock(store)
    first.release()
    LeaseLock(store).release()
    stale = LeaseLock(store, lease=-1)  # its holder stopped renewing: expired
    LeaseLock(store).release()
    assert stale.held


@pytest.mark.parametrize("link", ["folder", "chunk", "partial chunk"])
def test_no_write_follows_a_symlink_out_of_the_store(tmp_path, link):
    path, outside = tmp_path / "t.zarr", tmp_path / "outside"
    outside.mkdir()
    recorder = open_recorder(path, "w-")
    one_batch(recorder, 4 if link != "partial chunk" else 3)
    recorder.close()
    if link == "folder":
        os.rename(path / "a@output", outside / "a@output")
        os.symlink(outside / "a@output", path / "a@output")
    else:
        name = "c.1.0.0" if link == "chunk" else "c.0.0.0"
        (path / "a@output" / name).unlink(missing_ok=True)
        os.symlink(outside / "target", path / "a@output" / name)
    before = sorted(p.name for p in outside.rglob("*"))
    with pytest.raises(StoreError, match="symbolic link"):
        recorder = open_recorder(path, "a")
    assert sorted(p.name for p in outside.rglob("*")) == before


def test_a_link_made_while_writing_is_not_followed(tmp_path):
    path, outside = tmp_path / "t.zarr", tmp_path / "outside"
    outside.mkdir()
    recorder = open_recorder(path, "w-")
    one_batch(recorder)
    (path / "a@output").mkdir(exist_ok=True)
    os.symlink(outside / "target", path / "a@output" / "c.1.0.0")
    with pytest.raises(WriterError, match="chunk write"):
        one_batch(recorder, seed=1)
        recorder.close()
    assert not (outside / "target").exists()


def test_a_link_in_place_of_a_new_arrays_folder_is_not_followed(tmp_path):
    """A new array's folder is made with one mkdir, unchecked; a link already in its place
    makes that mkdir fail, and the link is then refused."""
    path, outside = tmp_path / "t.zarr", tmp_path / "outside"
    outside.mkdir()
    recorder = open_recorder(path, "w-")
    one_batch(recorder)
    os.symlink(outside, path / "b@output")
    with pytest.raises(WriterError, match="symbolic link"):
        recorder.begin_pass(4)
        recorder.put("b", "output", np.zeros((4, 6, 8), np.float32),
                     ("batch", "token", "hidden"))
        recorder.end_pass()
        recorder.close()
    assert list(outside.iterdir()) == []
