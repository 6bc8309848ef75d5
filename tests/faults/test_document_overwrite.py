"""Arrays' own documents rewritten at a close in place (core/commit.py, overwrite_in_place):
the file always holds the old document or the new one, whatever moment a SIGKILL comes, and
only small plain files are written so."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from layerscope.core.commit import IN_PLACE_BYTES, overwrite_in_place

FILES = 200
#: two versions of a document of different lengths (the shape's digits grow, then not)
SHORT = json.dumps({"shape": [0, 16, 64], "attributes": {"pad": "x" * 300}}).encode()
LONG = json.dumps({"shape": [123456789, 16, 64], "attributes": {"pad": "y" * 900}}).encode()

CHILD = textwrap.dedent("""
    import sys
    from layerscope.core.commit import overwrite_in_place
    folder, short, long = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
    names = [f"{folder}/{i}.json" for i in range(int(sys.argv[4]))]
    print("ready", flush=True)
    while True:  # until killed: every file to the other version, again and again
        for data in (long, short):
            for name in names:
                assert overwrite_in_place(name, data)
""")


def test_shorter_and_longer_documents_read_back_exactly(tmp_path):
    path = tmp_path / "zarr.json"
    path.write_bytes(LONG)
    assert overwrite_in_place(str(path), SHORT)
    assert json.loads(path.read_bytes()) == json.loads(SHORT)
    assert path.read_bytes().rstrip(b" ") == SHORT  # padded with spaces to the old length
    assert overwrite_in_place(str(path), LONG)
    assert path.read_bytes() == LONG


def test_large_documents_links_and_missing_files_are_left_to_a_rename(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(SHORT)
    assert not overwrite_in_place(str(big), b" " * (IN_PLACE_BYTES + 1))
    assert big.read_bytes() == SHORT
    target = tmp_path / "outside.json"
    target.write_bytes(SHORT)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert not overwrite_in_place(str(link), LONG)
    assert target.read_bytes() == SHORT
    assert not overwrite_in_place(str(tmp_path / "none.json"), SHORT)
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("seed", range(3))
def test_a_kill_at_any_moment_leaves_the_old_or_the_new_document(tmp_path, seed):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(FILES):
        (folder / f"{i}.json").write_bytes(SHORT)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(seed)
    mixed = 0
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-P", str(script), str(folder),
                                  SHORT.decode(), LONG.decode(), str(FILES)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL, err
        versions = set()
        for i in range(FILES):
            raw = (folder / f"{i}.json").read_bytes()
            doc = json.loads(raw)
            assert doc in (json.loads(SHORT), json.loads(LONG)), raw[:80]
            versions.add(doc["shape"][0])
        mixed += len(versions) == 2
    assert mixed, "no kill came while the files were being rewritten"
    assert sorted(os.listdir(folder)) == sorted(f"{i}.json" for i in range(FILES))
