"""One writer per store: a lock that survives crashes.

Interface. A :class:`StoreLock` is taken before a writer changes anything in a store
(:func:`lock_store`) and given back after its last write (:meth:`StoreLock.release`); a
second writer meanwhile gets :class:`StoreLockedError` naming the holder (pid, host, since
when). Readers take no lock: they trust only what a commit published.

Local disks (:class:`LocalLock`). The file ``_layerscope/lock`` inside the store, held with
``fcntl.flock`` for the writer's lifetime. The kernel drops the lock when its process dies, so
the lock of a crashed writer is taken over by the next one without any staleness guess; the
file itself stays and only says who held it last (JSON: pid, host, created). ``flock`` locks
belong to an open file, so two writers in one process exclude each other too. Network file
systems that do not pass ``flock`` on are outside this guarantee.

Object stores and other zarr stores (:class:`LeaseLock`). There is no flock: the lock is the
key ``_layerscope/lock`` created with a conditional write (``store.set_if_not_exists``, on S3
``PUT`` with ``If-None-Match: *``) holding the holder's JSON, a random token and a lease
expiry. Whoever reads back its own token holds the lock; a lock whose lease expired is stale
(its writer died) and is deleted and taken again; the holder renews the lease at each commit
(:meth:`StoreLock.renew`). A coordinated multi-worker run builds on the same pieces: the
coordinator holds the store's lock for the run, and each worker takes a lease on its own
sample range (``_layerscope/leases/<first>-<stop>``, created the same conditional way) so
that a range whose worker died is recognised by its expired lease and handed to another.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import uuid
from typing import Any, Protocol

from .errors import StoreLockedError

LOCK_KEY = "_layerscope/lock"
LEASE_SECONDS = 600.0


class StoreLock(Protocol):
    def renew(self) -> None: ...

    def release(self) -> None: ...


def holder_document(**extra: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **extra}


def _describe(holder: Any, where: str) -> str:
    if not isinstance(holder, dict):
        return f"{where} is being written by another writer; wait for it to finish or stop it"
    return (f"{where} is being written by another writer (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('created')}); wait for it to finish or "
            "stop it, or write to another path")


class LocalLock:
    """``fcntl.flock`` on ``<store>/_layerscope/lock``, held until :meth:`release`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        import fcntl

        self.root = os.fspath(root)
        folder = os.path.join(self.root, "_layerscope")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "lock")
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"null")
            except ValueError:
                holder = None
            os.close(fd)
            raise StoreLockedError(_describe(holder, self.root)) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_document()).encode(), 0)

    def renew(self) -> None:
        """Nothing to renew: the kernel holds the lock for as long as the process lives."""

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the file lets go of the flock


class LeaseLock:
    """A conditionally created key with a lease, for stores without file locks."""

    def __init__(self, store: Any, lease: float = LEASE_SECONDS) -> None:
        from ._zarr_compat import delete_key, get_bytes, set_bytes_if_not_exists

        self.store, self.lease, self.token = store, lease, uuid.uuid4().hex
        for _ in range(2):
            set_bytes_if_not_exists(store, LOCK_KEY, self._document())
            raw = get_bytes(store, LOCK_KEY)
            holder = _loads(raw)
            if isinstance(holder, dict) and holder.get("token") == self.token:
                self.held = True
                return
            if isinstance(holder, dict) and float(holder.get("expires", 0)) < time.time():
                delete_key(store, LOCK_KEY)  # its writer stopped renewing: it died
                continue
            break
        raise StoreLockedError(_describe(holder, str(store)))

    def _document(self) -> bytes:
        return json.dumps(holder_document(token=self.token,
                                          expires=time.time() + self.lease)).encode()

    def renew(self) -> None:
        from ._zarr_compat import set_bytes

        if self.held:
            set_bytes(self.store, LOCK_KEY, self._document())

    def release(self) -> None:
        from ._zarr_compat import delete_key

        if self.held:
            self.held = False
            delete_key(self.store, LOCK_KEY)


def _loads(raw: bytes | None) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


#: locks taken by :func:`lock_store` and not yet adopted by a writer, by store
_TAKEN: dict[str, StoreLock] = {}


def _store_id(store: Any) -> str:
    root = getattr(store, "root", None)
    if isinstance(store, (str, os.PathLike)):
        return os.path.realpath(store)
    if isinstance(root, (str, os.PathLike)):
        return os.path.realpath(root)
    return f"id:{id(store)}"


def lock_store(store: Any) -> StoreLock:
    """Take the writer's lock of ``store`` (a local folder or a zarr store); a writer opened
    on it next adopts the lock (:func:`adopt_lock`)."""
    key = _store_id(store)
    lock: StoreLock
    if key.startswith("id:"):
        lock = LeaseLock(store)
    else:
        lock = LocalLock(key)
    _TAKEN[key] = lock
    return lock


def adopt_lock(store: Any) -> StoreLock:
    """The lock :func:`lock_store` took for ``store``, or a new one."""
    taken = _TAKEN.pop(_store_id(store), None)
    return taken if taken is not None else lock_store_now(store)


def lock_store_now(store: Any) -> StoreLock:
    lock = lock_store(store)
    _TAKEN.pop(_store_id(store), None)
    return lock
