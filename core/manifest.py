"""The per-chunk checksum manifest: which chunk files each committed batch wrote, with their
size and crc32c, kept outside the root ``zarr.json`` (which every open reads and every commit
rewrites).

Format. Before the root document that commits batch ``n`` is published, the writer writes
``_layerscope/chunks/b<n:08d>.json`` (``n`` zero-padded to 8 digits)::

    {"batch": n, "chunks": {"<array name>/<chunk file name>": [nbytes, crc32c], ...}}

listing every chunk file written for batch ``n`` (and, in a store with gathered variables, the
gathered chunks its commit makes durable, which hold rows of the batches before it too:
core/gather.py): ``nbytes`` is the file's size and ``crc32c``
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c

from ._rawfile import write_document
from .errors import DamagedStoreError

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


def write_local_file(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> None:
    """Write ``data`` as ``path`` in one step: a temporary file (mode 0666 less the umask)
    renamed over it; with ``durable``, the file's bytes reach the disk before the rename."""
    write_document(os.fspath(path), data, durable)


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


@dataclass
class Manifest:
    """The effective entries of the committed batches' manifest files: key -> (nbytes, crc32c,
    batch), the batch being the highest committed one whose file lists the key.

    ``present``: the store has manifest files at all (``checksums=False`` stores have none).
    ``missing``: committed batches whose file is absent although an earlier one exists (a
    store appended to with checksums after batches written without has none for its first
    batches; that is no damage). ``damaged``: (manifest key, what is wrong) for files that do
    not parse. ``rows``: array name -> row-chunk index -> the highest chunk index listed for
    those rows along each other axis, filled by readers that know the arrays' layouts
    (:func:`.chunkcheck.index_rows`).
    """

    entries: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    present: bool = False
    first: int | None = None  # the first batch with a manifest file
    missing: list[int] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)
    rows: dict[str, dict[int, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def sound(self) -> bool:
        return not self.missing and not self.damaged

    @property
    def complete(self) -> bool:
        """Every committed batch has its manifest: a chunk file it does not list within the
        committed rows was never committed."""
        return self.sound and self.first == 0

    def defects(self) -> list[str]:
        """One line for each missing or damaged manifest file of a committed batch."""
        return ([f"chunk manifest {manifest_key(n)} of committed batch {n} is missing"
                 for n in self.missing]
                + [f"chunk manifest {key} {why}" for key, why in self.damaged])

    def raise_if_damaged(self, where: str) -> None:
        """Raise :class:`DamagedStoreError` when a manifest file does not parse."""
        if self.damaged:
            key, why = self.damaged[0]
            raise DamagedStoreError(f"{where}: chunk manifest {key} {why}; the store is "
                                    f"damaged; run `layerscope verify {where}`")


def parse_manifest(documents: list[bytes | None]) -> Manifest:
    """Merge the manifest files of the committed batches: ``documents[n]`` holds the bytes of
    batch ``n``'s file, or None where there is none. A later batch's entry for a key replaces
    an earlier one's; a file that does not parse is recorded in ``damaged``, never raised."""
    manifest = Manifest()
    first = next((n for n, doc in enumerate(documents) if doc is not None), None)
    if first is None:
        return manifest
    manifest.present, manifest.first = True, first
    for batch, raw in enumerate(documents):
        if raw is None:
            if batch > first:
                manifest.missing.append(batch)
            continue
        try:
            doc = json.loads(raw)
            chunks = doc["chunks"]
            if doc.get("batch") != batch or not isinstance(chunks, dict):
                raise ValueError("its batch number or chunk list is wrong")
            for name, entry in chunks.items():
                nbytes, crc = entry
                if not (_is_count(nbytes) and _is_count(crc)):
                    raise ValueError(f"the entry of {name} is not [nbytes, crc32c]")
                manifest.entries[str(name)] = (nbytes, crc, batch)  # later batches win
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            manifest.damaged.append((manifest_key(batch), f"does not parse ({exc})"))
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(store_root: Any, committed_batches: int) -> Entries:
    """Effective ``key -> (nbytes, crc32c)`` of a store's committed batches, read in this
    thread (readers of a trace load it asynchronously, through :func:`parse_manifest` too).

    ``store_root``: a local store's folder, or a zarr store. Batches without a manifest file
    contribute nothing; a later batch's entry replaces an earlier one's. A manifest file that
    does not parse raises :class:`DamagedStoreError` naming it.
    """
    manifest = parse_manifest([_read(store_root, manifest_key(batch))
                               for batch in range(int(committed_batches))])
    manifest.raise_if_damaged(str(store_root))
    return {key: (nbytes, crc) for key, (nbytes, crc, _) in manifest.entries.items()}


def _read(store_root: Any, key: str) -> bytes | None:
    if isinstance(store_root, (str, os.PathLike)):
        try:
            return (Path(store_root) / key).read_bytes()
        except FileNotFoundError:
            return None
    from ._zarr_compat import get_bytes

    return get_bytes(store_root, key)
