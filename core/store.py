"""Opening and creating trace stores: modes, schema checks, group attributes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from ._zarr_compat import set_bytes
from .commit import root_document, write_root
from .errors import SchemaError, StoreError
from .format import SCHEMA_VERSION, STATUS_REPLACING
from .lock import adopt_lock, lock_store
from .validate import being_replaced

StorePath = str | os.PathLike[str]


def is_local(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and "://" not in str(path)


def read_root_attrs(path: StorePath) -> dict[str, Any] | None:
    """Root attributes of a local store, or None when ``path`` holds no Zarr v3 group."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta} is not readable JSON ({exc}); the store is damaged") from exc
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        return None
    attrs = doc.get("attributes", {})
    return attrs if isinstance(attrs, dict) else None




def check_schema(attrs: dict[str, Any], where: str) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise SchemaError(f"{where} is a Zarr group but not a layerscope trace (no schema_version)")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError(f"{where} has schema_version {version!r}, not an integer; the store "
                          "is damaged")
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has schema_version {version}, newer than this layerscope reads "
            f"({SCHEMA_VERSION}); upgrade layerscope"
        )
    if attrs.get("status") == STATUS_REPLACING:
        raise being_replaced(where)


def tombstone_attrs() -> dict[str, Any]:
    """The attributes of a store being replaced: still a valid group, marked dead."""
    from layerscope import __version__

    return {"schema_version": SCHEMA_VERSION, "layerscope_version": __version__,
            "status": STATUS_REPLACING}


def _looks_like_trace(target: Path) -> bool:
    """Whether a folder without a readable root document is what a layerscope writer left:
    its ``_layerscope`` folder, or only arrays whose attributes a layerscope writer made."""
    if (target / "_layerscope").is_dir():
        return True
    arrays = 0
    for entry in target.iterdir():
        if entry.name.startswith(".zarr.json."):
            continue  # a root document a commit was writing
        try:
            doc = json.loads((entry / "zarr.json").read_text())
        except (OSError, ValueError):
            return False
        if not (isinstance(doc, dict) and doc.get("node_type") == "array"
                and "order" in (doc.get("attributes") or {})):
            return False
        arrays += 1
    return arrays > 0


def _refuse_links(target: Path) -> None:
    """A store with a symbolic link where the writer writes (a variable folder or a chunk
    file) is refused: nothing a writer does may land outside the store."""
    for entry in os.scandir(target):
        if entry.is_symlink():
            raise StoreError(f"{entry.path} is a symbolic link; a trace store holds none, and "
                             "layerscope writes nothing outside the store. Remove it first")
        if entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(entry.path):
                if inner.is_symlink():
                    raise StoreError(
                        f"{inner.path} is a symbolic link; a trace store holds none, and "
                        "layerscope writes nothing outside the store. Remove it first")


def _clear(target: Path) -> None:
    """Delete everything in ``target`` but its root document and its writer's lock."""
    for entry in target.iterdir():
        if entry.name == "zarr.json":
            continue
        if entry.name == "_layerscope" and entry.is_dir() and not entry.is_symlink():
            for inner in entry.iterdir():
                if inner.name != "lock":
                    _remove(inner)
            continue
        _remove(entry)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def prepare_path(path: StorePath, mode: str) -> dict[str, Any] | None:
    """Apply ``mode`` to a local path, holding its writer's lock (see core/lock.py).
    Returns the existing attributes when appending, None when a new store is to be made.

    Overwriting is crash-safe: the old root document is first replaced, in one atomic step,
    by a tombstone (a valid group whose status says ``replacing``), then the rest is deleted;
    the new store's root document replaces the tombstone later in one write. A kill at any
    moment leaves the old store, the tombstone (refused by readers, replaced by mode='w'), or
    the new store.
    """
    if mode not in ("w-", "w", "a"):
        raise StoreError(f"mode must be 'w-' (new), 'w' (overwrite) or 'a' (append), not {mode!r}")
    target = Path(path)
    if not target.exists():
        if not target.parent.exists():
            raise StoreError(f"cannot write {target}: folder {target.parent} does not exist")
        try:
            target.mkdir()
        except FileExistsError:
            raise StoreError(f"{target} was created by someone else meanwhile") from None
        lock_store(target)
        return None
    if mode == "w-":
        raise StoreError(
            f"{target} already exists; pass mode='w' to overwrite it or mode='a' to append"
            " (CLI: --overwrite / --append)"
        )
    if target.is_symlink() or not target.is_dir():
        raise StoreError(f"{target} exists and is not a layerscope trace; refusing to "
                         f"{'overwrite' if mode == 'w' else 'append to'} it. Choose another path.")
    try:
        attrs = read_root_attrs(target)
    except StoreError:
        attrs = None
    known = attrs is not None and "schema_version" in attrs
    if not (known or not any(target.iterdir()) or _looks_like_trace(target)):
        raise StoreError(
            f"{target} exists and is not a layerscope trace; refusing to "
            f"{'overwrite' if mode == 'w' else 'append to'} it. Choose another path."
        )
    lock = lock_store(target)
    try:
        if mode == "a":
            if attrs is None or not known:
                if any(p.name != "_layerscope" for p in target.iterdir()):
                    raise StoreError(f"cannot append to {target}: it holds no committed trace "
                                     "(its writer stopped early); write it with mode='w'")
                return None
            check_schema(attrs, str(target))
            _refuse_links(target)
            return attrs
        if known and attrs is not None and attrs.get("status") != STATUS_REPLACING:
            check_schema(attrs, str(target))
        write_root(target, root_document(tombstone_attrs(), {}, 0))
        _clear(target)
        return None
    except BaseException:
        lock.release()
        adopt_lock(target)
        raise


def open_group_for_writing(path: Any, mode: str, attrs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Create (or reopen for appending) the root group of a trace; returns it and its attrs.

    The writer's lock is held from here (:func:`adopt_lock` hands it to the writer). A new
    store is made with one write of its root document, every attribute in it.
    """
    import zarr

    if not is_local(path):
        group = zarr.open_group(path, mode="w", zarr_format=3)
        lock_store(group.store)
        set_bytes(group.store, "zarr.json", root_document(attrs, {}, 0))
        return zarr.open_group(group.store, mode="r+", use_consolidated=False), attrs
    existing = prepare_path(path, mode)
    try:
        if existing is not None:
            for key in ("framework", "model"):
                if existing.get(key) != attrs.get(key):
                    raise SchemaError(
                        f"cannot append to {path}: its {key} is {existing.get(key)!r}, this "
                        f"trace's is {attrs.get(key)!r}; write to a new store instead"
                    )
        else:
            write_root(Path(path), root_document(attrs, {}, 0))
        # never trust consolidated shapes when writing: they are cut to the committed rows
        group = zarr.open_group(confined_store(path), mode="r+", use_consolidated=False)
    except BaseException:
        adopt_lock(path).release()
        raise
    return group, existing if existing is not None else attrs


def confined_store(path: StorePath) -> Any:
    """A zarr LocalStore for ``path`` that refuses to write through a symbolic link."""
    from zarr.storage import LocalStore

    class ConfinedLocalStore(LocalStore):
        async def set(self, key: str, value: Any) -> None:
            _check_no_link(Path(self.root), key)
            await super().set(key, value)

        async def set_if_not_exists(self, key: str, value: Any) -> None:
            _check_no_link(Path(self.root), key)
            await super().set_if_not_exists(key, value)

    return ConfinedLocalStore(Path(path))


def _check_no_link(root: Path, key: str) -> None:
    current = root
    for part in key.split("/"):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise StoreError(f"{current} is a symbolic link; layerscope writes nothing outside "
                             f"the store {root}. Remove it first")
