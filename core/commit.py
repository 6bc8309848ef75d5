"""Publishing a commit: one write of the root ``zarr.json`` holding the group attributes and
the consolidated metadata of every array, with the batch axis cut to the committed rows.

Readers that use consolidated metadata (``layerscope.open_trace`` and plain
``xarray.open_zarr``) therefore see only committed rows, with one length along ``batch`` for
every variable, even while a writer is mid-batch or after it crashed. A variable that skipped
a committed batch reads as its fill value there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._zarr_compat import set_bytes
from .manifest import fsync_dir, write_local_file


def array_document(array: Any) -> dict[str, Any]:
    """The consolidated-metadata entry of ``array``; only its batch length changes later."""
    # what zarr writes as the array's zarr.json, but without its indent, which would take
    # json's pure-Python encoder (slow, in the writer while the model runs)
    doc: dict[str, Any] = json.loads(json.dumps(array.metadata.to_dict(), allow_nan=True))
    return doc


def root_document(attrs: dict[str, Any], arrays: dict[str, dict[str, Any]], rows: int) -> bytes:
    """``arrays``: name -> :func:`array_document`, cut here to ``rows`` along ``batch``."""
    metadata = {}
    for name, doc in sorted(arrays.items()):
        if (doc.get("dimension_names") or [None])[0] == "batch":
            doc = {**doc, "shape": [rows, *doc["shape"][1:]]}
        metadata[name] = doc
    doc = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": attrs,
        "consolidated_metadata": {"kind": "inline", "must_understand": False,
                                  "metadata": metadata},
    }
    return json.dumps(doc, allow_nan=False).encode()  # no indent: keeps json's C encoder


def write_root(root: str | os.PathLike[str], document: bytes, durable: bool = False) -> None:
    """Replace a local store's root ``zarr.json`` by ``document`` in one atomic step."""
    write_local_file(Path(root) / "zarr.json", document, durable)
    if durable:
        fsync_dir(root)


def publish(group: Any, attrs: dict[str, Any], arrays: dict[str, dict[str, Any]],
            rows: int, durable: bool = False, synced: Iterable[str] = ()) -> None:
    """Replace the root metadata in one step (an atomic rename on local disks).

    ``durable``: first flush the folders ``synced`` (relative to the store's root: those
    that got new chunk or manifest files) and write the document through to the disk, then
    flush the root folder, so that a commit survives a power loss once this returns.
    """
    document = root_document(attrs, arrays, rows)
    root = getattr(group.store, "root", None)
    if isinstance(root, (str, os.PathLike)) and not group.path:
        if durable:
            for folder in sorted(set(synced)):
                if os.path.isdir(os.path.join(root, folder)):
                    fsync_dir(os.path.join(root, folder))
        write_root(root, document, durable)
        return
    key = f"{group.path}/zarr.json" if group.path else "zarr.json"
    set_bytes(group.store, key, document)
