"""``layerscope verify``: read every chunk of a trace within its committed rows and report
each one that is damaged, missing, or not the one that was written.

Each chunk file is checked as :class:`~.checked_store.CheckedStore` checks it on a normal read
(its own crc32c, its size against the array's metadata, the per-chunk manifest's size and
crc32c), without decoding it. Besides chunks, the report names store-level defects: manifest
files that are missing or do not parse, and arrays whose own ``zarr.json`` is missing or
disagrees with the consolidated metadata of the root.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checked_store import OFFLOAD_BYTES, fetch_manifest
from .chunkcheck import (
    ArrayLayout,
    chunk_problem,
    document_problem,
    index_rows,
    rewritten_past_commit,
)
from .errors import DamagedStoreError
from .manifest import Manifest
from .reader import _as_store
from .validate import RootDocument, check_claims, read_root, run_sync

#: chunks read at once
CONCURRENT_READS = 16
REWRITTEN = ("was rewritten by a batch that did not commit (the chunk across the committed "
             "boundary; its own crc32c holds and its committed rows are intact)")


@dataclass(frozen=True)
class ChunkFault:
    """One damaged or missing chunk: its variable, its key, and what is wrong with it."""

    variable: str
    key: str
    problem: str


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok``: nothing is damaged."""

    path: str
    manifest: bool  # the store has a per-chunk manifest (stores written before it have none)
    chunks: int = 0  # chunk positions checked within the committed rows
    files: int = 0  # chunk files read
    nbytes: int = 0  # bytes read
    absent: int = 0  # positions with no file and no manifest entry: they read as fill values
    faults: list[ChunkFault] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # store-level defects
    #: sound chunks worth a word, not damage: the chunk across the committed boundary as
    #: rewritten by a batch that did not commit (its committed rows are intact)
    notes: list[ChunkFault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults and not self.problems

    def summary(self) -> str:
        state = "ok" if self.ok else (f"DAMAGED: {len(self.faults)} damaged or missing chunks, "
                                      f"{len(self.problems)} other defects")
        checks = "crc32c, sizes and the chunk manifest" if self.manifest else \
            "crc32c and sizes only: the store has no chunk manifest (written before it existed)"
        return (f"{self.path}: {state}; {self.files} chunk files ({_size(self.nbytes)}) of "
                f"{self.chunks} chunk positions checked ({checks}); {self.absent} positions "
                "never written read as fill values")

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "ok": self.ok, "manifest": self.manifest, "chunks": self.chunks,
            "files": self.files, "nbytes": self.nbytes, "absent": self.absent,
            "faults": [fault.__dict__ for fault in self.faults], "problems": self.problems,
            "notes": [note.__dict__ for note in self.notes],
        }


def verify(path: Any, progress: bool = False) -> VerifyReport:
    """Check every chunk of the trace at ``path`` within its committed rows.

    Raises :class:`SchemaError` or :class:`DamagedStoreError` when the root metadata itself
    is unusable (nothing can be checked then); everything else is reported.
    """
    store, where = _as_store(path)
    root = read_root(store, where)
    check_claims(store, root, where)
    batches = int(root.attrs.get("committed_batches", 0))
    manifest = run_sync(fetch_manifest(store, batches))
    report = VerifyReport(where, manifest.present)
    if manifest.present:
        report.problems += manifest.defects()
        try:
            index_rows(manifest, root.layouts, where)
        except DamagedStoreError as exc:
            report.problems.append(str(exc))
    report.problems += run_sync(_array_documents(store, root))
    positions = list(_positions(root))
    bar = _progress(len(positions), progress)
    try:
        run_sync(_check_chunks(store, positions, manifest if manifest.present else None,
                               report, bar.update))
    finally:
        bar.close()
    report.faults.sort(key=lambda fault: (fault.variable, fault.key))
    report.notes.sort(key=lambda note: (note.variable, note.key))
    return report


def _positions(root: RootDocument) -> Iterator[tuple[ArrayLayout, str]]:
    """(array, chunk file) of every chunk position within the committed rows."""
    rows = int(root.attrs.get("committed_samples", 0))
    for layout in root.layouts.values():
        grid = list(layout.grid)
        if layout.batch_axis and grid:
            grid[0] = math.ceil(rows / layout.chunks[0])
        for index in np.ndindex(*grid):
            yield layout, layout.chunk_file(tuple(int(i) for i in index))


async def _check_chunks(store: Any, positions: list[tuple[ArrayLayout, str]],
                        manifest: Manifest | None, report: VerifyReport,
                        advance: Callable[[int], Any]) -> None:
    from zarr.buffer import default_buffer_prototype

    prototype = default_buffer_prototype()
    gate = asyncio.Semaphore(CONCURRENT_READS)

    async def check(layout: ArrayLayout, file: str) -> None:
        async with gate:
            buffer = await store.get(f"{layout.name}/{file}", prototype)
            data = None if buffer is None else np.asarray(buffer.as_numpy_array()).view(np.uint8)
            if data is not None and data.nbytes > OFFLOAD_BYTES:
                problem = await asyncio.to_thread(chunk_problem, layout, data, file, manifest)
            else:
                problem = chunk_problem(layout, data, file, manifest)
        report.chunks += 1
        if data is None:
            listed = manifest is not None and f"{layout.name}/{file}" in manifest.entries
            report.absent += problem is None and not listed
        else:
            report.files += 1
            report.nbytes += int(data.nbytes)
        if problem is not None:
            report.faults.append(ChunkFault(layout.name, f"{layout.name}/{file}", problem))
        elif rewritten_past_commit(layout, data, file, manifest):
            report.notes.append(ChunkFault(layout.name, f"{layout.name}/{file}", REWRITTEN))
        advance(1)

    for start in range(0, len(positions), 4096):  # bounded number of pending tasks
        await asyncio.gather(*(check(layout, file)
                               for layout, file in positions[start:start + 4096]))


async def _array_documents(store: Any, root: RootDocument) -> list[str]:
    """Defects of each array's own zarr.json, which appends and plain zarr readers use."""
    from zarr.buffer import default_buffer_prototype

    prototype = default_buffer_prototype()
    names = list(root.layouts)
    buffers = await asyncio.gather(*(store.get(f"{name}/zarr.json", prototype) for name in names))
    problems = []
    for name, buffer in zip(names, buffers, strict=True):
        problem = document_problem(None if buffer is None else buffer.to_bytes(),
                                   root.documents[name])
        if problem is not None:
            problems.append(f"array {name} {problem}")
    return problems


class _NoBar:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="verifying", unit="chunk")


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
