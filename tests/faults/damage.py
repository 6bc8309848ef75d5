"""Small traces for the read-side fault tests, their chunk manifests, and ways to damage them.

Until every writer records the per-chunk manifest itself, :func:`write_manifest` writes it here
from the chunk files on disk, in the format the writer uses (``_layerscope/chunks/b<n>.json``:
``{"batch": n, "chunks": {"<array>/<chunk file>": [nbytes, crc32c]}}``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import crc32c
import numpy as np

from ..core.test_writer import make_recorder, write_batches

BATCH_SIZE = 4


def make_trace(path: Path, batches: int = 3, manifest: str | None = "own", **options) -> np.ndarray:
    """A trace of ``batches`` batches of 4 samples: ``block.0@output`` (the returned values),
    ``block.0@output.call1`` (twice them), ``token_id`` and ``batch``.

    ``manifest``: "own" writes it here (crc32c of each chunk's bytes before its checksum),
    "writer" keeps what the writer recorded (else writes whole-file crc32c, as it does), None:
    no manifest, as in stores written before it existed."""
    recorder = make_recorder(path, **options)
    expected = write_batches(recorder, batches, size=BATCH_SIZE)
    recorder.close()
    if manifest != "writer" or not (path / "_layerscope").exists():
        shutil.rmtree(path / "_layerscope", ignore_errors=True)
        if manifest is not None:
            write_manifest(path, whole_files=manifest == "writer")
    return expected


def chunk_files(path: Path) -> list[str]:
    """Every chunk key of the store, ``<array>/<file>``, sorted."""
    keys = []
    for array in sorted(os.listdir(path)):
        folder = path / array
        if folder.is_dir() and (folder / "zarr.json").exists():
            keys += [f"{array}/{f}" for f in sorted(os.listdir(folder)) if f.startswith("c.")]
    return keys


def write_manifest(path: Path, whole_files: bool = False) -> None:
    """Record size and crc32c of every chunk file, per committed batch (one row-chunk each).

    The crc32c of a chunk ending in its own checksum is that checksum (of the bytes before
    it); ``whole_files``: of the whole file instead, which is one constant for such chunks."""
    root = json.loads((path / "zarr.json").read_text())
    meta = root["consolidated_metadata"]["metadata"]
    batches = root["attributes"]["committed_batches"]
    folder = path / "_layerscope" / "chunks"
    folder.mkdir(parents=True, exist_ok=True)
    listed: dict[int, dict[str, list[int]]] = {n: {} for n in range(batches)}
    for key in chunk_files(path):
        array, _, file = key.partition("/")
        rows = meta[array]["chunk_grid"]["configuration"]["chunk_shape"][0]
        first_row = int(file.split(".")[1]) * rows
        data = (path / key).read_bytes()
        checksum = meta[array]["codecs"][-1]["name"] == "crc32c" and not whole_files
        crc = crc32c.crc32c(data[:-4] if checksum else data)
        listed[first_row // BATCH_SIZE][key] = [len(data), crc]
    for n, chunks in listed.items():
        (folder / f"b{n:08d}.json").write_text(json.dumps({"batch": n, "chunks": chunks}))


def flip_byte(file: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= mask
    file.write_bytes(bytes(data))


def set_root(path: Path, text: str) -> None:
    (path / "zarr.json").write_text(text)


def edit_root(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed root document and write it back."""
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc)
    (path / "zarr.json").write_text(json.dumps(doc))
