"""A summary of a trace: variables, dims, shapes, dtypes, stored vs raw bytes, status."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .layout import dtype_name, itemsize
from .naming import token_axis_of
from .reader import LABELS, _as_store, _order
from .schema import DECODER_TOKEN_MASK, STATUS_WRITING, TOKEN_MASK, skipped_sites
from .validate import LocalFolder, RootDocument, check_claims, local_folder, read_root


@dataclass(frozen=True)
class VariableSummary:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    raw_bytes: int
    stored_bytes: int | None  # None when the store is not a local folder
    stack: str | None = None  # encoder / decoder, in encoder-decoder models
    layer: int | None = None  # the block within its stack
    attention: str | None = None  # self / cross, for attention maps
    #: the disk its files take, in the file system's blocks: less than ``stored_bytes``
    #: where chunks end in holes (the rows past the last batch), None where not local
    disk_bytes: int | None = None

    @property
    def place(self) -> str:
        """Where the variable sits, compactly: ``3``, ``encoder 0``, ``decoder 1 cross``."""
        parts = [self.stack or "", "" if self.layer is None else str(self.layer)]
        if self.stack == "decoder" and self.attention:  # an encoder only attends to itself
            parts.append(self.attention)
        return " ".join(p for p in parts if p) or "-"


@dataclass(frozen=True)
class TraceSummary:
    path: str
    attrs: dict[str, Any]
    variables: list[VariableSummary]
    #: token axis (``token``, ``decoder_token``) -> (fewest, most, stored) tokens per sample,
    #: from its mask; passes of different lengths share one store (core/growth.py)
    lengths: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def skipped(self) -> dict[str, str]:
        """``site@kind`` -> why it was not captured (the store's ``skipped`` attribute)."""
        return skipped_sites(self.attrs)

    @property
    def raw_bytes(self) -> int:
        return sum(v.raw_bytes for v in self.variables)

    @property
    def stored_bytes(self) -> int | None:
        return _total(v.stored_bytes for v in self.variables)

    @property
    def disk_bytes(self) -> int | None:
        return _total(v.disk_bytes for v in self.variables)


def _total(sizes: Iterable[int | None]) -> int | None:
    listed = list(sizes)
    return None if any(s is None for s in listed) else sum(s or 0 for s in listed)


def _folder_bytes(folder: str) -> tuple[int, int]:
    """The bytes in the files below ``folder`` (their lengths) and the disk they take."""
    total = disk = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    inner = _folder_bytes(entry.path)
                    total, disk = total + inner[0], disk + inner[1]
                else:
                    info = entry.stat(follow_symlinks=False)
                    total += info.st_size
                    # no blocks (a system that counts none, a file all hole): its length
                    disk += getattr(info, "st_blocks", 0) * 512 or info.st_size
    except OSError:
        pass
    return total, disk


def summarize(path: Any) -> TraceSummary:
    """Describe the trace at ``path``, reading no array data but the token masks.

    Built from the root document that :func:`.reader.open_trace` checks too (the same checks
    run here), not from an xarray Dataset: a trace of thousands of variables is described
    in a fraction of the time opening it takes. A local folder is read with plain file calls
    (zarr and numpy are imported only to count the tokens of a trace with a token mask)."""
    store, where = _open(path)
    root = read_root(store, where)
    check_claims(store, root, where)
    local = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    variables = []
    for name in sorted((n for n in root.documents if _is_data_variable(n, root)),
                       key=lambda n: _order(root.documents[n].get("attributes") or {})):
        doc = root.documents[name]
        attrs = doc.get("attributes") or {}
        dims = tuple(str(d) for d in doc.get("dimension_names") or ())
        shape = tuple(int(n) for n in doc["shape"])
        dtype = _dtype_name(doc["data_type"])
        stored, disk = _folder_bytes(os.path.join(local, name)) if local is not None \
            else (None, None)
        layer = attrs.get("layer")
        variables.append(VariableSummary(
            name, dims, shape, dtype, math.prod(shape) * _itemsize(dtype), stored,
            attrs.get("stack") or None, int(layer) if layer is not None else None,
            _attention_type(attrs, dims), disk,
        ))
    return TraceSummary(str(path), dict(root.attrs), variables,
                        _token_lengths(store, where, root))


def _open(path: Any) -> tuple[Any, str]:
    """A :class:`LocalFolder` for a local path, else the zarr store ``open_trace`` reads."""
    where = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(where, str) and "://" not in where:
        return local_folder(where), where
    return _as_store(path)


def _is_data_variable(name: str, root: RootDocument) -> bool:
    """What xarray makes a data variable: neither a label coordinate nor named after its dim."""
    dims = root.documents[name].get("dimension_names") or ()
    return name not in LABELS and name not in dims


def _dtype_name(data_type: Any) -> str:
    """The dtype as xarray names it: numpy's name, ``object`` for text."""
    if data_type == "string" or not isinstance(data_type, str):
        return "object"
    try:
        return dtype_name(data_type)
    except TypeError:
        return data_type


def _itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name: 8 for ``object`` (a pointer, as numpy counts it)
    and for a name numpy does not know."""
    if dtype == "object":
        return 8
    try:
        return itemsize(dtype)
    except TypeError:
        return 8


def _token_lengths(store: Any, where: str, root: RootDocument) -> dict[str, tuple[int, int, int]]:
    lengths = {}
    checked = None
    for axis, name in (("token", TOKEN_MASK), ("decoder_token", DECODER_TOKEN_MASK)):
        doc = root.documents.get(name)
        if doc is None or not doc["shape"][0]:
            continue
        if checked is None:  # chunks read as open_trace reads them: checked first
            checked = _checked_store(store, where, root)
        fewest, most = _mask_counts(checked, name, doc)
        lengths[axis] = (fewest, most, int(doc["shape"][-1]))
    return lengths


def _checked_store(store: Any, where: str, root: RootDocument) -> Any:
    from .checked_store import CheckedStore

    if isinstance(store, LocalFolder):
        from zarr.storage import LocalStore

        store = LocalStore(store.root, read_only=True)
    return CheckedStore(store, where, root.layouts, root.documents,
                        int(root.attrs.get("committed_batches", 0)),
                        live=root.attrs.get("status") == STATUS_WRITING)


def _mask_counts(checked: Any, name: str, doc: dict[str, Any]) -> tuple[int, int]:
    """The fewest and most real tokens of a sample in the token mask ``name``."""
    import numpy as np

    from ._zarr_compat import array_from_document

    mask = array_from_document(checked, name, doc)
    rows = int(doc["shape"][0])
    step = max(1, int(doc["chunk_grid"]["configuration"]["chunk_shape"][0]))
    fewest, most = None, None
    for start in range(0, rows, step):  # one row-chunk at a time
        counts = np.asarray(mask[start:min(rows, start + step)]).sum(axis=-1)
        fewest = int(counts.min()) if fewest is None else min(fewest, int(counts.min()))
        most = int(counts.max()) if most is None else max(most, int(counts.max()))
    return int(fewest or 0), int(most or 0)


def _attention_type(attrs: dict[str, Any], dims: tuple[str, ...]) -> str | None:
    """``self`` / ``cross`` of an attention map: its attribute, else told by its last two
    axes (queries and keys labeled by different token axes attend across stacks)."""
    if attrs.get("attention") in ("self", "cross"):
        return str(attrs["attention"])
    if str(attrs.get("kind", "")).split(".")[0] != "attention" or len(dims) < 2:
        return None
    query, key = (token_axis_of(d) for d in dims[-2:])
    if query is None or key is None:
        return None
    return "cross" if query != key else "self" if attrs.get("stack") else None


def human_bytes(count: float | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def stored_size(summary: TraceSummary) -> str:
    """``15.6 MB stored (2.7 MB on disk)``: files' lengths count the holes that the rows
    past a trace's last batch leave in its last chunks; the disk does not."""
    stored, disk = summary.stored_bytes, summary.disk_bytes
    on_disk = f" ({human_bytes(disk)} on disk)" if disk is not None and stored is not None \
        and abs(disk - stored) > stored // 10 else ""
    return f"{human_bytes(stored)} stored{on_disk}"


def format_summary(summary: TraceSummary) -> str:
    attrs = summary.attrs
    model = attrs.get("model", {})
    lines = [
        f"trace      {summary.path}",
        f"status     {attrs.get('status')}  ({attrs.get('committed_batches')} batches, "
        f"{attrs.get('committed_samples')} samples committed)",
        f"framework  {attrs.get('framework')} {attrs.get('framework_version')}",
        f"model      {model.get('class', '?')}" + (f" ({model['name']})" if "name" in model else ""),
        f"created    {attrs.get('created')}   layerscope {attrs.get('layerscope_version')}, "
        f"schema {attrs.get('schema_version')}",
        f"size       {stored_size(summary)} / {human_bytes(summary.raw_bytes)} raw, "
        f"{len(summary.variables)} variables",
    ]
    for axis, (fewest, most, stored) in summary.lengths.items():
        label = "tokens" if axis == "token" else "dec tokens"
        lines.append(f"{label:<10} {fewest}..{most} per sample (min..max; the {axis} axis "
                     f"holds {stored}, filled past each sample's own)")
    lines += [
        "",
    ]
    width = max((len(v.name) for v in summary.variables), default=8)
    place = max([len("layer")] + [len(v.place) for v in summary.variables])
    lines.append(f"{'variable':<{width}}  {'layer':<{place}}  {'dims':<40} {'shape':<22} "
                 f"{'dtype':<8} {'stored':>9} {'raw':>9}")
    for v in summary.variables:
        dims = "(" + ", ".join(v.dims) + ")"
        shape = "(" + ", ".join(str(n) for n in v.shape) + ")"
        lines.append(f"{v.name:<{width}}  {v.place:<{place}}  {dims:<40} {shape:<22} "
                     f"{v.dtype:<8} {human_bytes(v.stored_bytes):>9} "
                     f"{human_bytes(v.raw_bytes):>9}")
    skipped = summary.skipped
    if skipped:
        lines += ["", f"not captured ({len(skipped)})"]
        width = max(len(name) for name in skipped)
        lines += [f"{name:<{width}}  {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)
