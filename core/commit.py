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


def published_shapes(group: Any) -> dict[str, tuple[int, ...]]:
    """Each array's shape past ``batch`` as the root document's consolidated metadata
    publishes it (an array's own zarr.json is written at a writer's close only)."""
    from ._zarr_compat import get_bytes

    try:
        raw = get_bytes(group.store, f"{group.path}/zarr.json" if group.path else "zarr.json")
        metadata = json.loads(raw or b"{}").get("consolidated_metadata") or {}
        return {name: tuple(int(n) for n in doc["shape"][1:])
                for name, doc in (metadata.get("metadata") or {}).items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


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


#: threads writing arrays' own documents at a close (the work is mostly system calls)
DOCUMENT_WRITERS = 4


def save_array_documents(group: Any, documents: dict[str, dict[str, Any]],
                         durable: bool = False) -> None:
    """Write each array's own ``zarr.json`` (``documents``: name -> its metadata, shape as it
    is to be read), each in one step: on a local disk a file renamed into place, several at
    a time; elsewhere one ``store.set`` each, all at once."""
    root = getattr(group.store, "root", None)
    prefix = f"{group.path}/" if group.path else ""
    encoded = {f"{prefix}{name}/zarr.json": json.dumps(doc, allow_nan=False).encode()
               for name, doc in documents.items()}
    if isinstance(root, (str, os.PathLike)):
        if durable:  # each file, then its folder, flushed in turn: slow, and asked for
            for key, data in encoded.items():
                write_local_file(Path(root) / key, data, durable=True)
                fsync_dir(os.path.dirname(os.path.join(root, key)))
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(DOCUMENT_WRITERS, thread_name_prefix="layerscope-close") as pool:
            for _ in pool.map(lambda item: write_local_file(Path(root) / item[0], item[1]),
                              encoded.items()):
                pass
        return
    from ._zarr_compat import set_many

    set_many(group.store, encoded)
