"""A summary of a trace: variables, dims, shapes, dtypes, stored vs raw bytes, status."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import skipped_sites
from .reader import open_trace


@dataclass(frozen=True)
class VariableSummary:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    raw_bytes: int
    stored_bytes: int | None  # None when the store is not a local folder


@dataclass(frozen=True)
class TraceSummary:
    path: str
    attrs: dict[str, Any]
    variables: list[VariableSummary]

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
    """Describe the trace at ``path`` without reading any array data."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # info reports the status itself
        ds = open_trace(path)
    local = Path(path) if isinstance(path, (str, os.PathLike)) else None
    variables = []
    for name in ds.data_vars:
        var = ds[name]
        stored = _folder_bytes(local / str(name)) if local is not None else None
        variables.append(VariableSummary(
            str(name), tuple(str(d) for d in var.dims), tuple(var.shape), str(var.dtype),
            int(var.size * var.dtype.itemsize), stored,
        ))
    return TraceSummary(str(path), dict(ds.attrs), variables)


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
        "",
    ]
    width = max((len(v.name) for v in summary.variables), default=8)
    lines.append(f"{'variable':<{width}}  {'dims':<40} {'shape':<22} {'dtype':<8} "
                 f"{'stored':>9} {'raw':>9}")
    for v in summary.variables:
        dims = "(" + ", ".join(v.dims) + ")"
        shape = "(" + ", ".join(str(n) for n in v.shape) + ")"
        lines.append(f"{v.name:<{width}}  {dims:<40} {shape:<22} {v.dtype:<8} "
                     f"{human_bytes(v.stored_bytes):>9} {human_bytes(v.raw_bytes):>9}")
    skipped = summary.skipped
    if skipped:
        lines += ["", f"not captured ({len(skipped)})"]
        width = max(len(name) for name in skipped)
        lines += [f"{name:<{width}}  {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)
