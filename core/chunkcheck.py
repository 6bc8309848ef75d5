"""What a chunk file must be: the checks a chunk's bytes pass before anything decodes them
(its layout, from the array's metadata, is :mod:`.layout`'s).

Three sources vouch for a chunk. Its own trailing crc32c (when the array has the checksum
codec) says the bytes are the ones that were encoded. The per-chunk manifest
(``_layerscope/chunks/b<n>.json``, written at each commit) says the file is the one written for
that key, with its size and crc32c, so a deleted, truncated or swapped chunk is caught too. The
array's metadata says how many bytes a decoded chunk holds, which a raw chunk's size and a Blosc
header repeat. Nothing here decodes a chunk.

For a chunk that ends in its own crc32c, the manifest records that checksum (the crc32c of the
bytes before it), which tells intact chunks apart; for other chunks, the crc32c of the whole
file (:mod:`.manifest` states the format). One chunk may differ from its manifest entry: the
chunk across the committed boundary, which an append rewrites in place before its batch
commits (:func:`past_committed`); it is accepted when its own crc32c holds.
"""

from __future__ import annotations

import json
from typing import Any

import crc32c
import numpy as np

from .errors import DamagedStoreError
from .layout import ArrayLayout
from .manifest import CHECKSUM_BYTES, Manifest
from .naming import growable_axis

BLOSC_HEADER = 16


def index_rows(manifest: Manifest, layouts: dict[str, ArrayLayout], where: str) -> None:
    """Record which row-chunks each array's listed chunks cover; a listed key that is no
    chunk of the arrays the metadata describes means metadata and manifest disagree."""
    for key in manifest.entries:
        name, _, file = key.rpartition("/")
        layout = layouts.get(name)
        index = layout.chunk_index(file) if layout is not None else None
        if index is None:
            raise DamagedStoreError(
                f"{where}: the chunk manifest lists {key}, which is no chunk of the arrays the "
                "root zarr.json describes: metadata and manifest disagree, the store is damaged; "
                f"run `layerscope verify {where}`"
            )
        rows = manifest.rows.setdefault(name, {})
        seen = rows.get(index[0], index[1:])
        rows[index[0]] = tuple(max(a, b) for a, b in zip(seen, index[1:], strict=True))


#: fields of an array's own zarr.json that must equal its copy in the root's consolidated metadata
SAME_FIELDS = ("data_type", "chunk_grid", "chunk_key_encoding", "codecs", "dimension_names",
               "fill_value")


def document_problem(own: bytes | None, consolidated: dict[str, Any]) -> str | None:
    """How an array's own ``zarr.json`` (``own``; None: there is none) disagrees with its copy
    in the root's consolidated metadata; the length along ``batch`` may differ (the root's is
    cut to the committed rows)."""
    if own is None:
        return ("has no zarr.json of its own (appending and readers without consolidated "
                "metadata need it)")
    try:
        doc = json.loads(own)
        fields = {key: doc.get(key) for key in SAME_FIELDS}
        trailing = list(doc["shape"][1:])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        return f"has a zarr.json that does not parse ({exc})"
    differs = [key for key in SAME_FIELDS if fields[key] != consolidated.get(key)]
    if not _same_trailing(trailing, consolidated):
        differs.append("shape")
    if differs:
        return ("has a zarr.json that disagrees with the root's consolidated metadata in "
                + ", ".join(differs))
    return None


def _same_trailing(own: list[Any], consolidated: dict[str, Any]) -> bool:
    """Whether an array's own shape past ``batch`` is its consolidated one. A token axis may
    differ: an array's own ``zarr.json`` is written when it is created and at a writer's
    close, while each commit publishes the token axes' committed lengths (:mod:`.growth`)."""
    shape = list(consolidated["shape"][1:])
    names = list(consolidated.get("dimension_names") or [])[1:]
    if len(own) != len(shape) or len(names) != len(shape):
        return own == shape
    return all(mine == theirs or (growable_axis(str(dim))
                                  and isinstance(mine, int) and mine >= 0)
               for mine, theirs, dim in zip(own, shape, names, strict=True))


def chunk_problem(layout: ArrayLayout, data: np.ndarray | None, file: str,
                  manifest: Manifest | None) -> str | None:
    """What is wrong with the chunk file ``file`` of ``layout`` holding ``data`` (a flat uint8
    array, None: no such file), or None when nothing is."""
    key = f"{layout.name}/{file}"
    entry = manifest.entries.get(key) if manifest is not None else None
    if data is None:
        if entry is not None:
            return f"is missing (the manifest of batch {entry[2]} lists it)"
        index = layout.chunk_index(file)
        written = manifest.rows.get(layout.name, {}) if manifest is not None else {}
        # a chunk past every one written for its rows along some axis is a token axis grown
        # after them (see .growth): those rows read as fill values there
        if manifest is not None and manifest.sound and index is not None \
                and index[0] in written and all(
                    i <= top for i, top in zip(index[1:], written[index[0]], strict=True)):
            return ("is missing though the other chunks of its rows were written: the metadata "
                    "claims chunks nobody wrote")
        return None  # never written: reads as the fill value
    size = int(data.nbytes)
    body_crc, own_crc_ok = _own_crc(data)
    if entry is None and manifest is not None and manifest.complete \
            and not (layout.checksum and own_crc_ok and past_committed(layout, file)):
        return ("is listed in the manifest of no committed batch: it was left by a write that "
                "never committed")
    if entry is not None:
        nbytes, crc, batch = entry
        if size != nbytes and not own_crc_ok:
            return f"has {size} bytes where batch {batch} wrote {nbytes} (truncated or damaged)"
        if layout.checksum and own_crc_ok:
            if (size != nbytes or crc != body_crc) and not past_committed(layout, file):
                return (f"is a valid chunk but not the one batch {batch} wrote (swapped or "
                        "replaced)")
        elif not layout.checksum and (size != nbytes or crc != crc32c.crc32c(data.data)):
            return f"does not match the size and crc32c batch {batch} recorded (damaged)"
    if layout.checksum:
        if body_crc is None:
            return f"has {size} bytes, fewer than its {CHECKSUM_BYTES}-byte checksum (truncated)"
        if not own_crc_ok:
            return "is damaged: its crc32c checksum does not match its bytes"
    return _shape_problem(layout, data, size - (CHECKSUM_BYTES if layout.checksum else 0))


def past_committed(layout: ArrayLayout, file: str) -> bool:
    """Whether the chunk ``file`` also holds rows past the committed ones (the array's shape
    along ``batch`` in the root document): the boundary chunk, which an append rewrites in
    place (committed rows kept, new rows merged in) before its batch commits.

    After a writer dies between that rewrite and the commit, the file differs from the last
    committed manifest entry (or, first written by that batch, is in no committed manifest)
    though its committed rows are intact (or fill values); a boundary chunk whose own crc32c
    holds is therefore accepted as it is (see :func:`rewritten_past_commit`). Only in a store
    that did not end ``complete``: in a complete one no batch was in flight, and its boundary
    chunk must be the one its manifest names."""
    if not (layout.batch_axis and layout.open_ended):
        return False
    index = layout.chunk_index(file)
    return index is not None and (index[0] + 1) * layout.chunks[0] > layout.shape[0]


def rewritten_past_commit(layout: ArrayLayout, data: np.ndarray | None, file: str,
                          manifest: Manifest | None) -> bool:
    """Whether the chunk file ``file`` (holding ``data``, no problem found by
    :func:`chunk_problem`) is the boundary chunk as rewritten by a batch that did not commit
    (yet): it differs from its manifest entry, and its own crc32c holds."""
    if manifest is None or data is None or not layout.checksum \
            or not past_committed(layout, file):
        return False
    entry = manifest.entries.get(f"{layout.name}/{file}")
    body_crc, own_crc_ok = _own_crc(data)
    return own_crc_ok and (entry is None or (int(data.nbytes), body_crc) != entry[:2])


def _own_crc(data: np.ndarray) -> tuple[int | None, bool]:
    """The crc32c of the bytes before the last 4 (None: fewer bytes than that), and whether
    those 4 bytes hold it (a chunk ending in its own checksum)."""
    if data.nbytes < CHECKSUM_BYTES:
        return None, False
    body_crc = int(crc32c.crc32c(data[:-CHECKSUM_BYTES].data))
    return body_crc, body_crc == int.from_bytes(data[-CHECKSUM_BYTES:].tobytes(), "little")


def _shape_problem(layout: ArrayLayout, data: np.ndarray, body: int) -> str | None:
    """Whether the chunk holds as many bytes as the metadata's chunk shape and dtype say."""
    expected = layout.decoded_nbytes
    if expected is None:
        return None
    if layout.body == "raw" and body != expected:
        return (f"holds {body} bytes where its chunk shape {list(layout.chunks)} needs "
                f"{expected}: the chunk or the array's metadata is damaged")
    if layout.body == "blosc":
        if body < BLOSC_HEADER:
            return f"holds {body} bytes, fewer than a Blosc header (truncated)"
        header = data[:BLOSC_HEADER].tobytes()
        decoded = int.from_bytes(header[4:8], "little")
        stored = int.from_bytes(header[12:16], "little")
        if decoded != expected or stored != body:
            return (f"is a Blosc chunk of {decoded} bytes ({stored} stored) where its chunk "
                    f"shape needs {expected} ({body} stored): the chunk or the metadata is damaged")
    return None
