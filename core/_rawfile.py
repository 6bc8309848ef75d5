"""Writing one chunk file: its page-aligned head with ``O_DIRECT``, the rest through the
page cache. Standard library only: the chunk-writing process (:mod:`._chunk_child`) runs it
without importing layerscope, numpy or zarr.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
#: smaller chunks go through the page cache (their bytes are few). From 64 KiB on, a page-cache
#: write costs the writer thread CPU in proportion to its bytes, several times that of an
#: O_DIRECT write where the cache takes pages the machine has not touched yet (a long trace
#: grows the cache; on a virtual machine each such page is a fault on the host): 160 KB
#: took 500-650 us of CPU against about 100 us with O_DIRECT, and a writer thread's CPU is
#: taken from the model (benchmarks/README.md, "Many captured sites")
DIRECT_FROM = 64 << 10
DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere chunks go through the page cache
#: O_NOFOLLOW: a chunk file that is a symlink is refused (ELOOP), never written through
CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def write_file(path: str, body: Any, trailer: bytes, direct: bool, durable: bool,
               aligned: Callable[[Any], Any] = lambda body: body,
               length: int | None = None) -> bool:
    """``body`` then ``trailer`` as the file ``path``: the page-aligned head of ``aligned(body)``
    with ``O_DIRECT`` where ``direct`` and the body is large enough. ``length`` (at least
    the body's): the trailer starts there, the bytes between read as zeros (a hole: nothing
    is written for them). Returns ``direct``, False once the file system refused
    ``O_DIRECT`` (the file then went through the page cache)."""
    head = direct_head(len(memoryview(body).cast("B")), direct)
    if head:
        try:
            write_direct(path, aligned(body), head, trailer, durable, length)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct = False
    write_cached(path, body, trailer, durable, length)
    return direct


def used_bytes(nbytes: int, used: int, rows: int) -> int:
    """The bytes to write of a body of ``nbytes`` (``rows`` rows) whose first ``used`` rows
    alone are ever read: the pages that hold them (the rest of the file is left a hole)."""
    return min(nbytes, -(-nbytes * used // rows // ALIGN) * ALIGN)


def zeros(count: int) -> memoryview:
    """``count`` zero bytes (to checksum a hole), from one buffer kept for the next call."""
    global _ZEROS
    if len(_ZEROS) < count:
        _ZEROS = memoryview(bytes(count))  # a thread holding the old one keeps it
    return _ZEROS[:count]


_ZEROS = memoryview(b"")


def direct_head(nbytes: int, direct: bool) -> int:
    """The bytes of a body of ``nbytes`` to write with ``O_DIRECT`` (0: none)."""
    return nbytes // ALIGN * ALIGN if direct and DIRECT and nbytes >= DIRECT_FROM else 0


def write_direct(path: str, body: Any, head: int, trailer: bytes, durable: bool,
                 length: int | None = None) -> None:
    """``body`` (page-aligned memory) and ``trailer`` as the file ``path`` (the trailer at
    ``length``, see :func:`write_file`), the first ``head`` bytes with ``O_DIRECT``. EINVAL:
    the file system refuses ``O_DIRECT``."""
    import fcntl  # only where O_DIRECT exists, i.e. on Linux

    view = memoryview(body).cast("B")
    fd = os.open(path, CREATE | DIRECT, 0o666)
    try:
        write_all(fd, [view[:head]])
        # F_SETFL sets only the status flags; of those this file has O_DIRECT alone (no
        # F_GETFL: each call hands Python's lock to the model's thread and back)
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)
        _write_tail(fd, view, head, trailer, length)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_cached(path: str, body: Any, trailer: bytes, durable: bool,
                 length: int | None = None) -> None:
    """``body`` and ``trailer`` as the file ``path`` (the trailer at ``length``, see
    :func:`write_file`), through the page cache."""
    fd = os.open(path, CREATE, 0o666)
    try:
        _write_tail(fd, memoryview(body).cast("B"), 0, trailer, length)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_tail(fd: int, view: memoryview, start: int, trailer: bytes,
                length: int | None) -> None:
    """``view[start:]`` (written up to ``start`` already) and ``trailer``; the trailer at
    offset ``length`` where that lies past the body, zeros between (a hole)."""
    if length is None or length <= view.nbytes:
        write_all(fd, [view[start:], trailer])
        return
    write_all(fd, [view[start:]])
    if trailer:
        os.lseek(fd, length, os.SEEK_SET)
        write_all(fd, [trailer])
    else:
        os.ftruncate(fd, length)


def write_document(path: str, data: Any, durable: bool = False,
                   new_folder: bool = False) -> None:
    """Write ``data`` as ``path`` in one step: a temporary file (mode 0666 less the umask)
    renamed over it; with ``durable``, the file's bytes reach the disk before the rename.

    ``new_folder``: the folder is made first, with one ``mkdir`` (an array's folder right
    under a checked one: what ``mkdir`` makes is no link); one already in its place is
    refused if it is a symbolic link, and so is a link at ``path`` in it (``ELOOP``)."""
    folder, name = os.path.split(path)
    if new_folder:
        try:
            os.mkdir(folder)
        except FileExistsError:
            for checked in (folder, path):
                if os.path.islink(checked):
                    raise OSError(errno.ELOOP, "a symbolic link; layerscope writes nothing "
                                  "outside the store. Remove it first", checked) from None
    tmp = os.path.join(folder, f".{name}.{os.urandom(16).hex()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        try:
            write_all(fd, [data])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_all(fd: int, parts: list[Any]) -> None:
    """``os.writev`` until every byte is written (a write may stop short), as few calls as
    the system allows: each call hands Python's lock to another thread and back."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    first = 0
    while first < len(views):
        batch = views[first:first + _IOV_MAX]
        written = os.writev(fd, batch) if hasattr(os, "writev") else os.write(fd, batch[0])
        while first < len(views) and written >= views[first].nbytes:
            written -= views[first].nbytes
            first += 1
        if written:
            views[first] = views[first][written:]


def _iov_max() -> int:
    try:
        return max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
    except (AttributeError, ValueError, OSError):
        return 16


_IOV_MAX = _iov_max()  # buffers one writev takes
