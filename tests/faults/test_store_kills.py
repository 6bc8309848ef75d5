"""SIGKILL a writer at chosen and random moments — during chunk writes, during a commit,
while mode="w" deletes the old store, while a store is created — then: the store opens (its
committed rows read back bit for bit, old store or new) or is refused with a one-line
StoreError, and mode="w" always replaces it (issue 14, items 2 and 3)."""

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
from layerscope.core import DamagedStoreError, StoreError, read_attrs

CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import layerscope.core.commit as commit
    import layerscope.core.manifest as manifest
    import layerscope.core.store as store
    import layerscope.core.committing as committing
    from layerscope.core import Selection, StoreOptions
    from layerscope.core.format import new_group_attrs
    from layerscope.core.recorder import Recorder
    from layerscope.core.writer import TraceWriter

    path, mode, tag, batches, kill_at, nth = sys.argv[1:7]
    tag, batches, nth = int(tag), int(batches), int(nth)

    def killing(owner, name):
        original = getattr(owner, name)
        calls = [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)

    if kill_at == "remove":  # while mode="w" deletes the old store
        killing(store, "_remove")
    elif kill_at == "create":  # between the tombstone / lock and the new root document
        killing(store, "write_root")
    elif kill_at == "manifest":
        killing(committing, "write_manifest")
    elif kill_at == "publish":
        killing(committing, "publish")
    elif kill_at == "replace":  # the root document's own rename
        killing(manifest.os, "replace")

    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = store.open_group_for_writing(path, mode, attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode=mode),
                                    int(existing.get("committed_samples", 0)),
                                    int(existing.get("committed_batches", 0))),
                        Selection(), "numpy")
    print("ready", flush=True)
    for number in range(batches):
        size = 3 if number % 3 == 2 else 4
        data = np.random.default_rng(1000 * tag + number).standard_normal((size, 6, 8), np.float32)
        recorder.begin_pass(size)
        recorder.put("a", "output", data, ("batch", "token", "hidden"))
        recorder.put("b", "output", data * 2, ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()
""")


def expected(tag, batches):
    return np.concatenate([
        np.random.default_rng(1000 * tag + n).standard_normal((3 if n % 3 == 2 else 4, 6, 8),
                                                              np.float32)
        for n in range(batches)])


def run(tmp_path, path, mode, tag, batches, kill_at="", nth=0, kill_after=None):
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    args = [sys.executable, "-P", str(script), str(path), mode, str(tag), str(batches),
            kill_at, str(nth)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=60)
    return child.returncode, err


def check(path, tags):
    """The store opens with committed rows of one of ``tags`` exactly, or is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = layerscope.open_trace(path)
            rows = int(ds.attrs["committed_samples"])
            if not rows:
                return "empty"
            a, b = ds["a@output"].values, ds["b@output"].values
    except StoreError as exc:
        assert "\n" not in str(exc), exc
        return "refused"
    for tag in tags:
        want = expected(tag, 30)[:rows]
        if np.array_equal(a, want):
            np.testing.assert_array_equal(b, want * 2)
            return f"tag {tag}"
    raise AssertionError(f"{path}: committed rows match no writer's data")


def replace_and_check(tmp_path, path):
    code, err = run(tmp_path, path, "w", 9, 4)
    assert code == 0, err
    assert check(path, [9]) == "tag 9"
    assert read_attrs(path)["status"] == "complete"


CHOSEN = [("remove", 3), ("create", 1), ("create", 2), ("manifest", 2), ("publish", 3),
          ("replace", 4)]


@pytest.mark.parametrize(("kill_at", "nth"), CHOSEN)
def test_kill_at_chosen_moments_of_an_overwrite(tmp_path, kill_at, nth):
    path = tmp_path / "t.zarr"
    code, err = run(tmp_path, path, "w-", 1, 8)
    assert code == 0, err
    code, _ = run(tmp_path, path, "w", 2, 8, kill_at, nth)
    assert code == -signal.SIGKILL
    outcome = check(path, [1, 2])
    if kill_at in ("remove", "create"):
        assert outcome in ("refused", "tag 1") or (kill_at == "create" and outcome == "empty")
    replace_and_check(tmp_path, path)


@pytest.mark.parametrize(("kill_at", "nth"), [("create", 1), ("publish", 1), ("replace", 1)])
def test_kill_while_a_new_store_is_created(tmp_path, kill_at, nth):
    path = tmp_path / "t.zarr"
    code, _ = run(tmp_path, path, "w-", 1, 4, kill_at, nth)
    assert code == -signal.SIGKILL
    assert check(path, [1]) in ("refused", "empty")
    replace_and_check(tmp_path, path)


def test_kill_at_random_moments(tmp_path):
    rng = random.Random(14)
    outcomes = []
    for trial in range(5):
        path = tmp_path / f"t{trial}.zarr"
        if trial % 2:
            code, err = run(tmp_path, path, "w-", 1, 6)
            assert code == 0, err
        run(tmp_path, path, "w" if trial % 2 else "w-", 2, 30,
            kill_after=rng.uniform(0.3, 2.5))
        outcomes.append(check(path, [1, 2]))
        replace_and_check(tmp_path, path)
    assert outcomes


def test_overwrite_refuses_a_folder_that_is_not_a_trace(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    code, err = run(tmp_path, path, "w", 1, 1)
    assert code != 0 and "not a layerscope trace" in err
    assert (path / "notes.txt").read_text() == "mine"


def test_a_store_without_root_document_is_replaced(tmp_path):
    path = tmp_path / "t.zarr"
    code, err = run(tmp_path, path, "w-", 1, 4)
    assert code == 0, err
    os.unlink(path / "zarr.json")
    replace_and_check(tmp_path, path)


def test_a_tombstone_is_a_one_line_store_error(tmp_path, capsys):
    """A store whose writer stopped while mode='w' replaced it (status ``replacing``): open_trace,
    read_attrs and ``layerscope info`` say so in one line and how to replace it; it is not
    reported as damaged."""
    from layerscope.cli import main

    path = tmp_path / "t.zarr"
    code, _ = run(tmp_path, path, "w-", 1, 4)
    code, _ = run(tmp_path, path, "w", 2, 4, "remove", 1)
    assert code == -signal.SIGKILL
    assert json.loads((path / "zarr.json").read_text())["attributes"]["status"] == "replacing"
    for read in (layerscope.open_trace, read_attrs):
        with pytest.raises(StoreError, match="being replaced \\(or created\\)") as info:
            read(path)
        message = str(info.value)
        assert not isinstance(info.value, DamagedStoreError), message
        assert "\n" not in message and "mode='w'" in message and "--overwrite" in message
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "being replaced" in err and "--overwrite" in err and "damaged" not in err
    replace_and_check(tmp_path, path)
