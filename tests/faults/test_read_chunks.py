"""Damaged chunks: each kind of damage raises ChunkError naming variable and key on a normal
read (through dask), and `layerscope verify` reports it (exit 1, one line per chunk)."""

from __future__ import annotations

import json
import os
import shutil

import crc32c
import numpy as np
import pytest

import layerscope
from layerscope import ChunkError, DamagedStoreError
from layerscope.cli import main
from layerscope.core.manifest import manifest_key, read_manifest

from .damage import chunk_files, flip_byte, make_trace

VAR = "block.0@output"
KEY = f"{VAR}/c.1.0.0"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "t.zarr"
    expected = make_trace(path)
    other = tmp_path_factory.mktemp("other") / "o.zarr"
    make_trace(other, batches=4)  # same layout, other values (batch 3 is new)
    return path, expected, other


@pytest.fixture()
def trace(pristine, tmp_path):
    path, expected, _ = pristine
    copy = tmp_path / "t.zarr"
    shutil.copytree(path, copy)
    return copy, expected


def _flip(path):
    flip_byte(path / KEY, 100)


def _truncate(path):
    data = (path / KEY).read_bytes()
    (path / KEY).write_bytes(data[: len(data) // 2])


def _delete(path):
    os.remove(path / KEY)


def _swap(path):
    a, b = (path / KEY).read_bytes(), (path / f"{VAR}/c.2.0.0").read_bytes()
    (path / KEY).write_bytes(b)
    (path / f"{VAR}/c.2.0.0").write_bytes(a)


def _foreign(path, other):
    shutil.copyfile(other / f"{VAR}/c.3.0.0", path / KEY)


DAMAGE = {"flipped byte": _flip, "truncated": _truncate, "deleted": _delete, "swapped": _swap,
          "from another store": _foreign}
WHAT = {"flipped byte": "crc32c", "truncated": "bytes where", "deleted": "missing",
        "swapped": "not the one", "from another store": "not the one"}


def _damage(name, path, pristine):
    if name == "from another store":
        _foreign(path, pristine[2])
    else:
        DAMAGE[name](path)


@pytest.mark.parametrize("name", list(DAMAGE))
def test_reading_a_damaged_chunk_raises_chunk_error(trace, pristine, name):
    path, expected = trace
    _damage(name, path, pristine)
    ds = layerscope.open_trace(path)  # opening reads no chunk
    np.testing.assert_array_equal(ds[VAR].isel(batch=slice(0, 4)).values, expected[:4])
    with pytest.raises(ChunkError) as info:
        ds[VAR].load()  # dask-backed: the type that reaches the caller is ChunkError
    error = info.value
    assert error.variable == VAR and error.key in (KEY, f"{VAR}/c.2.0.0")
    message = str(error)
    assert error.key in message and str(path) in message and "layerscope verify" in message
    assert WHAT[name] in message and "\n" not in message


@pytest.mark.parametrize("name", list(DAMAGE))
def test_verify_reports_each_damaged_chunk(trace, pristine, name, capsys):
    path, _ = trace
    _damage(name, path, pristine)
    report = layerscope.verify(path)
    assert not report.ok and report.manifest
    damaged = {fault.key for fault in report.faults}
    assert damaged == ({KEY, f"{VAR}/c.2.0.0"} if name == "swapped" else {KEY})
    assert all(fault.variable == VAR for fault in report.faults)
    assert main(["verify", str(path)]) == 1
    out, err = capsys.readouterr()
    assert KEY in out and "DAMAGED" in out and err == ""
    assert main(["verify", "--json", str(path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and {f["key"] for f in doc["faults"]} == damaged


def test_a_clean_store_verifies(trace, capsys):
    path, _ = trace
    report = layerscope.verify(path)
    assert report.ok and report.files == len(chunk_files(path)) and report.absent == 0
    assert main(["verify", str(path)]) == 0
    assert ": ok;" in capsys.readouterr().out


def test_the_cli_prints_one_line_and_no_traceback(trace, pristine):
    import subprocess
    import sys

    path, _ = trace
    _swap(path)
    verify = subprocess.run([sys.executable, "-m", "layerscope", "verify", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert KEY in verify.stdout and f"{VAR}/c.2.0.0" in verify.stdout
    info = subprocess.run([sys.executable, "-m", "layerscope", "info", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and VAR in info.stdout  # info reads no chunk


def test_without_a_manifest_only_checksums_are_checked(trace):
    path, expected = trace
    shutil.rmtree(path / "_layerscope")
    report = layerscope.verify(path)
    assert report.ok and not report.manifest and "no chunk manifest" in report.summary()
    _flip(path)
    with pytest.raises(ChunkError, match="crc32c"):
        layerscope.open_trace(path)[VAR].load()
    assert {f.key for f in layerscope.verify(path).faults} == {KEY}
    _delete(path)  # without a manifest a deleted chunk cannot be told from one never written
    assert layerscope.verify(path).absent == 1


def test_a_manifest_of_whole_file_checksums_is_not_accepted(trace):
    """For a chunk ending in its own crc32c the manifest records that checksum, never the
    crc32c of the whole file (one constant for every intact chunk, which cannot tell chunks
    apart): a manifest in that form is refused, chunk by chunk."""
    path, _ = trace
    for n in range(3):
        doc = json.loads((path / manifest_key(n)).read_text())
        doc["chunks"] = {key: [size, crc32c.crc32c((path / key).read_bytes())]
                         for key, (size, _) in doc["chunks"].items()}
        (path / manifest_key(n)).write_text(json.dumps(doc))
    report = layerscope.verify(path)
    assert {fault.key for fault in report.faults} == set(chunk_files(path))
    assert all("not the one" in fault.problem for fault in report.faults)
    with pytest.raises(ChunkError, match="not the one"):
        layerscope.open_trace(path)[VAR].load()


def test_the_writers_manifest_catches_a_swap(tmp_path):
    path = tmp_path / "w.zarr"
    make_trace(path, manifest="writer")
    assert layerscope.verify(path).ok
    _swap(path)
    with pytest.raises(ChunkError, match="not the one"):
        layerscope.open_trace(path)[VAR].load()
    assert {fault.key for fault in layerscope.verify(path).faults} == {KEY, f"{VAR}/c.2.0.0"}


def test_a_chunk_no_committed_batch_wrote_is_refused(trace):
    """A file within the committed rows that no manifest lists was left by a write that never
    committed: it is refused, never read as data."""
    path, _ = trace
    for n in range(3):
        doc = json.loads((path / manifest_key(n)).read_text())
        doc["chunks"].pop(KEY, None)
        (path / manifest_key(n)).write_text(json.dumps(doc))
    with pytest.raises(ChunkError, match="never committed"):
        layerscope.open_trace(path)[VAR].load()


@pytest.mark.parametrize("text", ["{nope", "[]", '{"batch": 0, "chunks": {}}',
                                  '{"batch": 1, "chunks": {"a/c.0": [1]}}',
                                  '{"batch": 1, "chunks": {"a/c.0": [-1, 2]}}'])
def test_damaged_manifest_files(trace, text):
    """Every reader of the manifest (the checked store, verify, read_manifest) parses it with
    core/manifest.py and reports a damaged file as DamagedStoreError naming it."""
    path, _ = trace
    (path / manifest_key(1)).write_text(text)
    with pytest.raises(DamagedStoreError, match="b00000001.json"):
        layerscope.open_trace(path)[VAR].load()
    with pytest.raises(DamagedStoreError, match="b00000001.json.*does not parse"):
        read_manifest(path, 3)
    report = layerscope.verify(path)
    assert any("b00000001.json" in problem for problem in report.problems)
    os.remove(path / manifest_key(1))
    assert any("b00000001.json" in p and "missing" in p for p in layerscope.verify(path).problems)


def test_checked_store_pickles(trace):
    import pickle

    path, expected = trace
    ds = layerscope.open_trace(path)
    data = pickle.loads(pickle.dumps(ds[VAR].data))
    np.testing.assert_array_equal(np.asarray(data), expected)
    error = pickle.loads(pickle.dumps(ChunkError("m", VAR, KEY)))
    assert (error.variable, error.key) == (VAR, KEY)
