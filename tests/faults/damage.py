"""Small traces for the read-side fault tests, their chunk manifests, and ways to damage them.

:func:`write_manifest` writes the per-chunk manifest from the chunk files on disk, through
core/manifest.py's own functions (the one format the writer uses too).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from layerscope.core.manifest import manifest_document, manifest_key, recorded_crc

from ..core.test_writer import make_recorder, write_batches

BATCH_SIZE = 4


def make_trace(path: Path, batches: int = 3, manifest: str | None = "own", **options) -> np.ndarray:
    """A trace of ``batches`` batches of 4 samples: ``block.0@output`` (the returned values),
    ``block.0@output.call1`` (twice them), ``token_id`` and ``batch``.

    ``manifest``: "own" writes it here from the files on disk, "writer" keeps what the writer
    recorded, None: no manifest, as in stores written before it existed."""
    recorder = make_recorder(path, **options)
    expected = write_batches(recorder, batches, size=BATCH_SIZE)
    recorder.close()
    if manifest != "writer":
        shutil.rmtree(path / "_layerscope", ignore_errors=True)
        if manifest is not None:
            write_manifest(path)
    return expected


def chunk_files(path: Path) -> list[str]:
    """Every chunk key of the store, ``<array>/<file>``, sorted."""
    keys = []
    for array in sorted(os.listdir(path)):
        folder = path / array
        if folder.is_dir() and (folder / "zarr.json").exists():
            keys += [f"{array}/{f}" for f in sorted(os.listdir(folder)) if f.startswith("c.")]
    return keys


def write_manifest(path: Path) -> None:
    """Record size and crc32c of every chunk file, per committed batch (one row-chunk each)."""
    root = json.loads((path / "zarr.json").read_text())
    meta = root["consolidated_metadata"]["metadata"]
    batches = root["attributes"]["committed_batches"]
    (path / manifest_key(0)).parent.mkdir(parents=True, exist_ok=True)
    listed: dict[int, dict[str, tuple[int, int]]] = {n: {} for n in range(batches)}
    for key in chunk_files(path):
        array, _, file = key.partition("/")
        rows = meta[array]["chunk_grid"]["configuration"]["chunk_shape"][0]
        first_row = int(file.split(".")[1]) * rows
        data = (path / key).read_bytes()
        checksum = meta[array]["codecs"][-1]["name"] == "crc32c"
        listed[first_row // BATCH_SIZE][key] = (len(data), recorded_crc(data, checksum))
    for n, chunks in listed.items():
        (path / manifest_key(n)).write_bytes(manifest_document(n, chunks))


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
