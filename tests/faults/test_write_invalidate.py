"""Appending after a crash never shows the crashed batch: rows past the committed length read
as fill values, even in a variable the new batch skips (issue 14, item 5)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import layerscope
import layerscope.cli
from layerscope.core.manifest import read_manifest

from ..core.test_writer import make_recorder

CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import layerscope.core.committing as committing
    from layerscope.core import Selection, StoreOptions
    from layerscope.core.format import new_group_attrs
    from layerscope.core.recorder import Recorder
    from layerscope.core.store import open_group_for_writing
    from layerscope.core.writer import TraceWriter

    path, size = sys.argv[1], int(sys.argv[2])
    calls = [0]
    original = committing.publish
    def publish(*args, **kwargs):  # the start of the append, then the batch's commit
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    committing.publish = publish
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = open_group_for_writing(path, "a", attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode="a"),
                                    existing["committed_samples"], existing["committed_batches"]),
                        Selection(), "numpy")
    recorder.begin_pass(size)
    for name in ("a", "b"):
        recorder.put(name, "output", np.full((size, 6, 8), 7.0, np.float32),
                     ("batch", "token", "hidden"))
    recorder.end_pass()
    recorder.close()
""")


def append(path, sizes, names, mode="a"):
    recorder = make_recorder(path, mode)
    for size in sizes:
        recorder.begin_pass(size)
        for name in names:
            recorder.put(name, "output", np.ones((size, 6, 8), np.float32),
                         ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()


@pytest.mark.parametrize(("first", "crashed"), [([4, 4], 4), ([4, 3], 3)])
def test_a_skipped_variable_reads_fill_values_not_the_crashed_batch(tmp_path, first, crashed):
    path = tmp_path / "t.zarr"
    append(path, first, ("a", "b"), mode="w-")
    script = tmp_path / "crash.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, "-P", str(script), str(path), str(crashed)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    append(path, [crashed], ("a",))  # skips b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = layerscope.open_trace(path)
    rows = sum(first)
    assert ds.attrs["committed_samples"] == rows + crashed
    b = ds["b@output"].values
    np.testing.assert_array_equal(b[:rows], 1.0)
    assert np.isnan(b[rows:]).all(), "the crashed batch's rows are visible"
    np.testing.assert_array_equal(ds["a@output"].values, 1.0)
    files = {f"{d.name}/{f.name}": f.stat().st_size for d in path.iterdir()
             if d.is_dir() and d.name != "_layerscope" for f in d.iterdir()
             if f.name.startswith("c.")}
    entries = read_manifest(path, ds.attrs["committed_batches"])
    assert {key: n for key, (n, _) in entries.items() if key in files} == files


def test_a_boundary_chunk_rewritten_by_a_batch_that_never_committed_still_reads(tmp_path,
                                                                                capsys):
    """An append rewrites the partial last chunk in place (committed rows kept, its own rows
    merged in) before it commits; killed in between, the file differs from the committed
    manifest entry, yet the committed rows in it read back bit for bit and verify passes."""
    path = tmp_path / "t.zarr"
    append(path, [4, 3], ("a", "b"), mode="w-")
    before = _values(path)
    boundary = path / "a@output" / "c.1.0.0"
    old = boundary.read_bytes()
    script = tmp_path / "crash.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, "-P", str(script), str(path), "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert boundary.read_bytes() != old, "the crashed append did not rewrite the boundary chunk"
    after = _values(path)
    assert after.keys() == before.keys()
    for name, data in before.items():
        assert after[name].dtype == data.dtype and after[name].tobytes() == data.tobytes(), name
    report = layerscope.verify(path)
    assert report.ok and "a@output/c.1.0.0" in {note.key for note in report.notes}
    assert layerscope.cli.main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a@output/c.1.0.0" in out and "did not commit" in out and "DAMAGED" not in out
    data = bytearray(boundary.read_bytes())  # still checked: a damaged one is refused
    data[10] ^= 0xFF
    boundary.write_bytes(bytes(data))
    # its own crc32c fails; where the rewrite changed its size, the size check speaks first
    with pytest.raises(layerscope.ChunkError, match="crc32c|truncated or damaged"):
        _values(path)


def _values(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = layerscope.open_trace(path)
    return {str(name): ds[name].values for name in ds.variables}


def test_a_boundary_chunk_first_written_by_a_batch_that_never_committed_still_reads(tmp_path):
    """A variable the last committed batch skipped has no chunk across the boundary yet; the
    crashed append writes one (fill values in the committed rows). It is in no committed
    manifest, yet the committed rows read as their fill values and verify passes."""
    path = tmp_path / "t.zarr"
    append(path, [4], ("a", "b"), mode="w-")
    append(path, [2], ("a",))  # b skips rows 4-5: its chunk 1 is never written
    script = tmp_path / "crash.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, "-P", str(script), str(path), "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (path / "b@output" / "c.1.0.0").exists(), "the crashed append wrote no chunk of b"
    values = _values(path)
    np.testing.assert_array_equal(values["b@output"][:4], 1.0)
    assert np.isnan(values["b@output"][4:6]).all()
    np.testing.assert_array_equal(values["a@output"], 1.0)
    assert layerscope.verify(path).ok


def test_a_complete_stores_boundary_chunk_must_be_the_one_its_manifest_names(tmp_path):
    """In a store that ended complete no batch was in flight, so its partial last chunk gets
    no leeway: a valid chunk of another store put in its place is refused, not read."""
    path, donor = tmp_path / "t.zarr", tmp_path / "donor.zarr"
    for target, value in ((path, 1.0), (donor, 2.0)):
        recorder = make_recorder(target)
        for size in (4, 3):
            recorder.begin_pass(size)
            recorder.put("a", "output", np.full((size, 6, 8), value, np.float32),
                         ("batch", "token", "hidden"))
            recorder.end_pass()
        recorder.close()
    (path / "a@output" / "c.1.0.0").write_bytes((donor / "a@output" / "c.1.0.0").read_bytes())
    with pytest.raises(layerscope.ChunkError, match="not the one"):
        _values(path)
    assert not layerscope.verify(path).ok
