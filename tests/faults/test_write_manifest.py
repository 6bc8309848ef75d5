"""The per-chunk checksum manifest (core/manifest.py), the root document's mode and the
durable option."""

from __future__ import annotations

import json
import os
import stat

import crc32c
import numpy as np
import pytest

import layerscope
import layerscope.core.commit as commit_module
import layerscope.core.manifest as manifest_module
from layerscope.core.manifest import read_manifest

from ..core.test_writer import make_recorder


def write(path, sizes, mode="w-", texts=True, **options):
    recorder = make_recorder(path, mode, **options)
    for number, size in enumerate(sizes):
        data = np.random.default_rng(number).standard_normal((size, 6, 8), np.float32)
        if texts:
            recorder.set_texts([f"text {number} {i}" for i in range(size)])
        recorder.begin_pass(size)
        recorder.put("layer.0", "output", data, ("batch", "token", "hidden"), "Block")
        recorder.end_pass()
    recorder.close()


def chunk_files(path):
    """key -> (size, crc32c of the bytes before the 4-byte trailer) of every chunk file: every
    array here ends in the crc32c codec, and the manifest records that checksum."""
    found = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "_layerscope"):
        codecs = json.loads((folder / "zarr.json").read_bytes())["codecs"]
        assert codecs[-1]["name"] == "crc32c"
        for file in folder.iterdir():
            if file.name.startswith("c"):
                data = file.read_bytes()
                crc = crc32c.crc32c(data[:-4])
                assert int.from_bytes(data[-4:], "little") == crc
                found[f"{folder.name}/{file.name}"] = (len(data), crc)
    return found


@pytest.mark.parametrize("sizes", [[4, 4, 4], [4, 3, 4, 2, 4]])
def test_the_manifest_lists_every_chunk_file_as_stored(tmp_path, sizes):
    path = tmp_path / "t.zarr"
    write(path, sizes)
    files = chunk_files(path)
    assert any(key.startswith("layer.0@output/") for key in files)
    assert any(key.startswith("input_text/") for key in files)  # written by zarr itself
    entries = read_manifest(path, len(sizes))
    assert entries == files
    first = json.loads((path / "_layerscope/chunks/b00000000.json").read_bytes())
    assert first["batch"] == 0 and set(first["chunks"]) <= set(files)


def test_appended_batches_list_the_chunks_they_rewrite(tmp_path):
    path = tmp_path / "t.zarr"
    write(path, [4, 3])
    write(path, [2, 4], mode="a")
    assert read_manifest(path, 4) == chunk_files(path)
    assert not (path / "_layerscope/chunks/b00000004.json").exists()


def test_no_manifest_without_checksums(tmp_path):
    path = tmp_path / "t.zarr"
    write(path, [4, 4], checksums=False)
    assert not (path / "_layerscope/chunks").exists()


def test_root_document_and_manifest_files_follow_the_umask(tmp_path):
    path = tmp_path / "t.zarr"
    old = os.umask(0o022)
    try:
        write(path, [4])
    finally:
        os.umask(old)
    for file in (path / "zarr.json", path / "_layerscope/chunks/b00000000.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_durable_commits_flush_files_and_folders_before_the_root_document(tmp_path,
                                                                         monkeypatch):
    """Each durable commit (not the store's creation) flushes its root document's new file
    before renaming it into place and the store's folder after; the folder holding the
    store's folder is flushed once; every chunk file is flushed before the last commit.
    Steps are told apart by path: writer threads create arrays (their own ``zarr.json``,
    renamed into place too) and flush chunks while a commit runs."""
    order = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        order.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        order.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write(tmp_path / "plain.zarr", [4, 4], texts=False)
    assert not any(step[0] == "fsync" for step in order)
    order.clear()
    store = tmp_path / "durable.zarr"
    write(store, [4, 4], texts=False, durable=True)
    synced = [(i, step[1]) for i, step in enumerate(order) if step[0] == "fsync"]
    roots = [(i, step[1]) for i, step in enumerate(order)
             if step[0] == "replace" and step[2] == str(store / "zarr.json")]
    roots = roots[1:]  # the store's creation: an empty store, nothing committed yet
    assert len(roots) >= 2, order  # a commit a batch at least
    for number, (at, new_file) in enumerate(roots):
        until = roots[number + 1][0] if number + 1 < len(roots) else len(order)
        assert any(path == new_file for i, path in synced if i < at), (new_file, order)
        assert any(path == str(store) for i, path in synced if at < i < until), order
    # the store's own folder is named in its parent's: flushed once, before the first commit
    parents = [i for i, path in synced if path == str(tmp_path)]
    assert len(parents) == 1 and roots[0][0] < parents[0] < roots[1][0], order
    last = roots[-1][0]
    before_last = {path for i, path in synced if i < last}
    chunks = [str(store / key) for key in chunk_files(store)]
    assert chunks and set(chunks) <= before_last, sorted(set(chunks) - before_last)
    assert manifest_module.fsync_dir is commit_module.fsync_dir


def test_without_the_checksum_codec_the_manifest_records_the_whole_files_crc32c(tmp_path):
    from layerscope.core.format import Compression

    path = tmp_path / "t.zarr"
    write(path, [4, 3], compression=Compression(checksum=False))
    files = {}
    for folder in (p for p in path.iterdir() if p.is_dir() and p.name != "_layerscope"):
        assert json.loads((folder / "zarr.json").read_bytes())["codecs"][-1]["name"] != "crc32c"
        for file in folder.glob("c.*"):
            data = file.read_bytes()
            files[f"{folder.name}/{file.name}"] = (len(data), crc32c.crc32c(data))
    assert files and read_manifest(path, 2) == files
    assert layerscope.verify(path).ok
