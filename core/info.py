"""A summary of a trace: variables, dims, shapes, dtypes, stored vs raw bytes, status."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .format import DECODER_TOKEN_MASK, TOKEN_MASK, skipped_sites
from .naming import token_axis_of
from .reader import open_trace


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
        sizes = [v.stored_bytes for v in self.variables]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def summarize(path: Any) -> TraceSummary:
    """Describe the trace at ``path``, reading no array data but the token masks."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # info reports the status itself
        ds = open_trace(path)
    local = Path(path) if isinstance(path, (str, os.PathLike)) else None
    variables = []
    for name in ds.data_vars:
        var = ds[name]
        stored = _folder_bytes(local / str(name)) if local is not None else None
        dims = tuple(str(d) for d in var.dims)
        layer = var.attrs.get("layer")
        variables.append(VariableSummary(
            str(name), dims, tuple(var.shape), str(var.dtype),
            int(var.size * var.dtype.itemsize), stored, var.attrs.get("stack") or None,
            int(layer) if layer is not None else None, _attention_type(var.attrs, dims),
        ))
    return TraceSummary(str(path), dict(ds.attrs), variables, _token_lengths(ds))


def _token_lengths(ds: Any) -> dict[str, tuple[int, int, int]]:
    lengths = {}
    for axis, name in (("token", TOKEN_MASK), ("decoder_token", DECODER_TOKEN_MASK)):
        if name not in ds.variables or not ds.sizes.get("batch"):
            continue
        mask = ds[name]
        counts = mask.sum(str(mask.dims[-1])).values  # read chunk by chunk
        lengths[axis] = (int(counts.min()), int(counts.max()), int(mask.shape[-1]))
    return lengths


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
        f"size       {human_bytes(summary.stored_bytes)} stored / "
        f"{human_bytes(summary.raw_bytes)} raw, {len(summary.variables)} variables",
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
