"""Writing encoded chunks straight to files of a local store.

A trace writes tens of MB per forward pass that nobody reads back soon. Written through the page
cache, every byte is copied once more and the pages must be found and later evicted, CPU time
the model pays for when it keeps every core busy. With ``O_DIRECT`` the disk reads the bytes
from our own (page-aligned) buffer instead. Only the aligned head of a chunk can go that way;
the few bytes of tail and the checksum follow through the page cache, into the same file.
Filesystems without ``O_DIRECT`` (tmpfs, some network mounts) get ordinary writes, and so
do the chunks a writer's close writes (:attr:`ChunkFiles.cached`): the close waits for them
while no model runs, and the page cache takes them sooner than the disk does.

Chunks reach disk only for rows not yet committed, so a half-written file is never one a reader
trusts: no temporary file and rename are needed (zarr's own store does that for every chunk).
The one exception, a gathered chunk that holds committed rows already (core/gather.py), is
written by :meth:`ChunkFiles.replace`: a new file renamed over the old.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from ._rawfile import ALIGN, DIRECT, write_file
from .errors import StoreError
from .hostpool import page_aligned
from .manifest import write_local_file

_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class ChunkFiles:
    """Writes chunk files under ``root``; ``direct`` tries ``O_DIRECT`` for the aligned head."""

    def __init__(self, root: Path, direct: bool = True, durable: bool = False) -> None:
        self.root = os.fspath(root)
        self.direct = bool(direct and DIRECT)
        self.durable = durable  # fsync each file before it is closed
        #: write through the page cache from now on: set at the writer's close, which waits
        #: for every chunk while no model runs; a page-cache write returns before the disk
        #: has the bytes, and the CPU it costs over O_DIRECT is taken from no model
        self.cached = False
        self._dirs: set[str] = set()
        self._scratch = threading.local()

    def write(self, key: str, body: np.ndarray, trailer: bytes,
              length: int | None = None) -> None:
        """Write ``body`` (uint8, contiguous) then ``trailer`` as the file ``root/key``; the
        trailer at ``length`` where the body is shorter, zeros between (a hole)."""
        direct = self.direct and not self.cached
        wrote = write_file(self.path(key), body, trailer, direct, self.durable, self._aligned,
                           length)
        if direct:
            self.direct = wrote

    def document(self, key: str, data: bytes) -> None:
        """Write a metadata document ``root/key`` in one step (a new file renamed into place),
        its folder made first, refusing links as :meth:`write` does."""
        path = os.path.join(self.root, key)
        parent = os.path.dirname(path)
        made = parent not in self._dirs and self._make_folder(parent)
        if not made and os.path.islink(path):  # a folder made just now holds nothing
            raise StoreError(f"{path} is a symbolic link; layerscope writes nothing outside "
                             f"the store {self.root}. Remove it first")
        write_local_file(path, data, self.durable)

    def replace(self, key: str, body: np.ndarray, trailer: bytes,
                length: int | None = None) -> None:
        """Write the file ``root/key`` in one step: a new file (mode 0666 less the umask),
        renamed over the old one once written, so a crash leaves the old file or the new."""
        path = os.path.join(self.root, key)
        parent, name = os.path.split(path)
        temporary = os.path.join(parent, f".{name}.{uuid.uuid4().hex}")
        self.write(os.path.relpath(temporary, self.root), body, trailer, length)
        try:
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def path(self, key: str) -> str:
        """The path of ``root/key``, its folder made (once) and checked for links."""
        path = os.path.join(self.root, key)
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            self._make_folder(parent)
        return path

    def process_or_make(self, folder: str) -> bool:
        """True where the chunk process is to make ``folder``, a new array's, with one
        ``mkdir`` (it lies right under the root or a folder checked before, as in
        :meth:`_make_folder`); else False, the folder existing already or made and checked
        here, now."""
        if folder in self._dirs:
            return False
        above = os.path.dirname(folder)
        if above == self.root or above in self._dirs:
            return True
        self._make_folder(folder)
        return False

    def made(self, folder: str) -> None:
        """``folder`` was made (by the chunk process) and needs no check."""
        self._dirs.add(folder)

    def _make_folder(self, folder: str) -> bool:
        """Make ``folder`` and refuse links in it; True where this call made it.

        A new array's folder, right under the root or a folder checked before, takes one
        ``mkdir`` and no check: what it makes is no link. A thousand arrays created at one
        close spent a tenth of their writer threads' time in ``makedirs`` and the checks."""
        above = os.path.dirname(folder)
        if above == self.root or above in self._dirs:
            try:
                os.mkdir(folder)
            except FileExistsError:
                pass  # made before: it may be a link
            else:
                self._dirs.add(folder)
                return True
        os.makedirs(folder, exist_ok=True)
        self._refuse_links(folder)
        self._dirs.add(folder)
        return False

    def _refuse_links(self, folder: str) -> None:
        """Refuse a folder that is, or lies below, a symbolic link inside the store."""
        relative = os.path.relpath(folder, self.root)
        current = self.root
        for part in relative.split(os.sep):
            current = os.path.join(current, part)
            if os.path.islink(current):
                raise StoreError(f"{current} is a symbolic link; layerscope writes nothing "
                                 f"outside the store {self.root}. Remove it first")

    def read(self, key: str, durable: bool = False) -> bytes | None:
        """The bytes of the file ``root/key`` (None if missing); ``durable``: fsync it."""
        try:
            fd = os.open(os.path.join(self.root, key), _READ)
        except FileNotFoundError:
            return None
        try:
            if durable:
                os.fsync(fd)
            parts = []
            while part := os.read(fd, 1 << 20):
                parts.append(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def _aligned(self, body: np.ndarray) -> np.ndarray:
        """``body`` itself when page-aligned, else a copy in this thread's aligned scratch."""
        if body.ctypes.data % ALIGN == 0:
            return body
        scratch = getattr(self._scratch, "buffer", None)
        if scratch is None or scratch.nbytes < body.nbytes:
            grown = max(body.nbytes, 0 if scratch is None else scratch.nbytes * 5 // 4)
            size = -(-grown // ALIGN) * ALIGN  # grown by a quarter: chunk sizes vary
            scratch = page_aligned(size)
            self._scratch.buffer = scratch
        out = scratch[: body.nbytes]
        out[...] = body
        return out

