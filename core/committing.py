"""Committing a writer's batches, in order, and publishing each commit.

A batch is *committed* once every chunk of it and of every earlier batch is on disk and no
gathered chunk holds its rows in memory only (:mod:`.gather`). It is *published* once its
manifest (with checksums on) and then the root document saying so are written
(:mod:`.commit`): readers trust rows up to the published ones only. After a failure nothing
is published until the close, which publishes the batches committed before it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .commit import EntryCache, fsync_parent, publish
from .format import STATUS_WRITING
from .growth import cut_document
from .manifest import MANIFEST_DIR, write_manifest

if TYPE_CHECKING:
    from .writer import TraceWriter
    from .writerecords import Batch


class StepFailed(Exception):
    """A failure inside a write, tagged with the step and the path it concerns."""

    def __init__(self, step: str, error: BaseException, where: str) -> None:
        super().__init__(step)
        self.step, self.error, self.where = step, error, where


class Commits:
    """The commit side of one :class:`.writer.TraceWriter`: how far its batches are
    committed and published, and the steps that move them there."""

    def __init__(self, writer: TraceWriter, batches: int, samples: int,
                 lengths: dict[str, int]) -> None:
        self.writer = writer
        #: committed: (batches, samples, token axes' lengths); under the writer's state lock
        self.batches, self.samples, self.lengths = batches, samples, lengths
        #: what the root document says is committed, under ``lock``
        self.published, self.published_samples = batches, samples
        self.published_lengths = lengths
        #: the samples the root document on disk commits: ``published_samples`` once its
        #: write returned (a caller that waits for a commit to survive a kill waits for this)
        self.root_samples = samples
        self.lock = threading.Lock()
        self.unpublished: list[Batch] = []  # committed, manifest not yet written
        self.synced: set[str] = set()  # folders with new files, flushed at a durable commit
        self.parent_synced = False  # the folder naming the store's own, flushed once
        self.entries = EntryCache()  # each array's root-document entry, kept

    def task_done(self, batch: Batch, count: int = 1, durable: bool = False) -> None:
        """``count`` tasks of ``batch`` are done: commit what may be committed where that was
        its last, or where those tasks made rows ``durable`` (a gathered group written: the
        batches before ``batch`` may commit). One commit for both: each publish rewrites the
        root document, 8-11 ms of Python's lock at 1,601 arrays."""
        writer = self.writer
        with writer._state_lock:
            batch.pending -= count
            ready = batch.ended and batch.pending == 0
            if batch.pending == 0:
                writer._drained.notify_all()
        if ready or durable:
            self.ready()

    def ready(self, final: bool = False) -> None:
        """Commit, in order, every finished batch that follows the last committed one, and
        publish; after a failure, publish only when ``final`` (the close): the batches whose
        chunks were all written before it, as far as the store still takes writes."""
        writer = self.writer
        with writer._state_lock:
            committed, samples, lengths = self.batches, self.samples, self.lengths
            while committed in writer._open:
                batch = writer._open[committed]
                if not batch.ended or batch.pending or batch.failed \
                        or writer._gathering.chunks.holds(batch.start + batch.size):
                    break
                del writer._open[committed]
                self.unpublished.append(batch)
                committed += 1
                samples = batch.start + batch.size
                lengths = batch.lengths
            self.batches, self.samples, self.lengths = committed, samples, lengths
        if writer._error is None or final:
            try:
                self.publish()
            except StepFailed as exc:
                writer._fail(exc.step, exc.error, exc.where)
            except BaseException as exc:
                writer._fail("commit", exc, writer._where)

    def publish(self) -> None:
        """Write the manifests of the batches committed since the last publish, then the
        root document that commits them."""
        writer = self.writer
        with self.lock:
            with writer._state_lock:
                committed, samples, lengths = self.batches, self.samples, self.lengths
                if committed == self.published:
                    return
                batches, self.unpublished = self.unpublished, []
            if writer.options.checksums:
                for done, batch in enumerate(batches):  # before the root document
                    try:
                        write_manifest(writer.group.store, batch.number, batch.chunks,
                                       writer.options.durable)
                    except BaseException as exc:
                        with writer._state_lock:  # not committed: a later publish retries
                            self.unpublished[:0] = batches[done:]
                        raise StepFailed("manifest write", exc,
                                         f"{writer._where}/{MANIFEST_DIR}") from exc
                self.synced.add(MANIFEST_DIR)
            self.published, self.published_samples = committed, samples
            self.published_lengths = lengths
            writer._lock.renew()
            writer.attrs.update(committed_batches=committed, committed_samples=samples,
                                status=STATUS_WRITING)
            self.write_root()
        writer._gathering.notify()  # a caller may wait for this commit (see .gatherwrite)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Update the group attributes and publish them with the published rows."""
        writer = self.writer
        with self.lock:
            writer.attrs.update(attrs)
            try:
                self.write_root()
            except BaseException as exc:
                writer._fail("commit", exc, writer._where)
                raise

    def write_root(self) -> None:
        """The root document: the attributes and every array's entry, cut to the published
        rows (called under ``lock``, or before the workers start)."""
        writer = self.writer
        with writer._create_lock:  # no array is half-created while its metadata is read
            documents = {v.name: cut_document(v.document, self.published_lengths)
                         for v in writer.variables.values() if v.document is not None}
        synced, self.synced = self.synced, set()
        publish(writer.group, writer.attrs, documents, self.published_samples,
                writer.options.durable, synced, self.entries)
        if writer.options.durable and not self.parent_synced:
            fsync_parent(writer.group)
            self.parent_synced = True
        self.root_samples = self.published_samples
