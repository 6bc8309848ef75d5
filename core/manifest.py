"""The per-chunk checksum manifest: which chunk files each committed batch wrote, with their
size and crc32c, kept outside the root ``zarr.json`` (which every open reads and every commit
rewrites).

Format. Before the root document that commits batch ``n`` is published, the writer writes
``_layerscope/chunks/b<n:08d>.json`` (``n`` zero-padded to 8 digits)::

    {"batch": n, "chunks": {"<array name>/<chunk file name>": [nbytes, crc32c], ...}}

listing every chunk file written for batch ``n``: ``nbytes`` is the file's size and ``crc32c``
a crc32c (Castagnoli, as an unsigned int; :func:`recorded_crc`). For an array whose last codec
is crc32c, every chunk file ends in a 4-byte little-endian crc32c of the bytes before it, and
the manifest records that checksum: the crc32c of the file's bytes before the trailer. (The
crc32c of the whole file would be one constant for every intact chunk, since the crc32c of any
message followed by its own crc32c is, and a chunk swapped for another would pass.) For an
array without that codec it records the crc32c of the whole file. This is the only form.

A chunk rewritten by a later batch (a partial chunk that zarr reads, merges and rewrites, or a
chunk invalidated before an append) is listed again in that batch's file; the entry that counts
for a key is the one in the highest committed batch file that lists it. Files of batches past
``committed_batches`` (a crashed batch) are ignored. The file is written atomically (a
temporary file renamed over it, mode 0644 under the umask) on local disks, in one ``store.set``
elsewhere. Stores written with ``StoreOptions(checksums=False)`` have no such files; a batch
without a file lists nothing.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import crc32c

MANIFEST_DIR = "_layerscope/chunks"
#: the size of the crc32c trailer of a chunk of an array whose last codec is crc32c
CHECKSUM_BYTES = 4

#: key -> (nbytes, crc32c)
Entries = dict[str, tuple[int, int]]


def manifest_key(batch: int) -> str:
    return f"{MANIFEST_DIR}/b{batch:08d}.json"


def recorded_crc(data: Any, checksum: bool) -> int:
    """The crc32c the manifest records for a chunk file holding ``data`` (bytes-like);
    ``checksum``: the array's last codec is crc32c, so the file ends in its own checksum."""
    view = memoryview(data).cast("B")
    return int(crc32c.crc32c(view[:-CHECKSUM_BYTES] if checksum else view))


def manifest_document(batch: int, chunks: Entries) -> bytes:
    return json.dumps({"batch": batch, "chunks": {key: [int(n), int(crc)] for key, (n, crc)
                                                  in sorted(chunks.items())}}).encode()


def write_local_file(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` as ``path`` in one step: a temporary file (mode 0666 less the umask)
    renamed over it; with ``durable``, the file's bytes reach the disk before the rename."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(store: Any, batch: int, chunks: Entries, durable: bool = False) -> None:
    """Write batch ``batch``'s manifest file into ``store`` (a zarr store)."""
    data = manifest_document(batch, chunks)
    root = getattr(store, "root", None)
    if isinstance(root, (str, os.PathLike)):
        target = Path(root) / manifest_key(batch)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_local_file(target, data, durable)
        return
    from ._zarr_compat import set_bytes

    set_bytes(store, manifest_key(batch), data)


def read_manifest(store_root: Any, committed_batches: int) -> dict[str, tuple[int, int]]:
    """Effective ``key -> (nbytes, crc32c)`` of a store's committed batches.

    ``store_root``: a local store's folder, or a zarr store. Batches without a manifest file
    contribute nothing; a later batch's entry replaces an earlier one's.
    """
    entries: dict[str, tuple[int, int]] = {}
    for batch in range(int(committed_batches)):
        data = _read(store_root, manifest_key(batch))
        if data is None:
            continue
        doc = json.loads(data)
        for key, (nbytes, crc) in doc["chunks"].items():
            entries[str(key)] = (int(nbytes), int(crc))
    return entries


def _read(store_root: Any, key: str) -> bytes | None:
    if isinstance(store_root, (str, os.PathLike)):
        try:
            return (Path(store_root) / key).read_bytes()
        except FileNotFoundError:
            return None
    from ._zarr_compat import get_bytes

    return get_bytes(store_root, key)
