"""Opening and creating trace stores: modes, schema checks, group attributes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import SchemaError, StoreError
from .format import SCHEMA_VERSION

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
    if doc.get("node_type") != "group":
        return None
    attrs = doc.get("attributes", {})
    return attrs if isinstance(attrs, dict) else None


def check_schema(attrs: dict[str, Any], where: str) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise SchemaError(f"{where} is a Zarr group but not a layerscope trace (no schema_version)")
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has schema_version {version}, newer than this layerscope reads "
            f"({SCHEMA_VERSION}); upgrade layerscope"
        )


def prepare_path(path: StorePath, mode: str) -> dict[str, Any] | None:
    """Apply ``mode`` to a local path. Returns existing attributes when appending."""
    if mode not in ("w-", "w", "a"):
        raise StoreError(f"mode must be 'w-' (new), 'w' (overwrite) or 'a' (append), not {mode!r}")
    target = Path(path)
    if not target.exists():
        if mode == "a":
            return None
        if not target.parent.exists():
            raise StoreError(f"cannot write {target}: folder {target.parent} does not exist")
        return None
    attrs = read_root_attrs(target)
    if mode == "w-":
        raise StoreError(
            f"{target} already exists; pass mode='w' to overwrite it or mode='a' to append"
            " (CLI: --overwrite / --append)"
        )
    if attrs is None or "schema_version" not in attrs:
        if target.is_dir() and not any(target.iterdir()):
            return None
        raise StoreError(
            f"{target} exists and is not a layerscope trace; refusing to "
            f"{'overwrite' if mode == 'w' else 'append to'} it. Choose another path."
        )
    check_schema(attrs, str(target))
    if mode == "w":
        shutil.rmtree(target)
        return None
    return attrs


def open_group_for_writing(path: Any, mode: str, attrs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Create (or reopen for appending) the root group of a trace; returns it and its attrs."""
    import zarr

    existing = prepare_path(path, mode) if is_local(path) else None
    if existing is not None:
        for key in ("framework", "model"):
            if existing.get(key) != attrs.get(key):
                raise SchemaError(
                    f"cannot append to {path}: its {key} is {existing.get(key)!r}, this trace's is "
                    f"{attrs.get(key)!r}; write to a new store instead"
                )
        # never trust consolidated shapes when writing: they are cut to the committed rows
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
        return group, existing
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update(attrs)
    return group, attrs
