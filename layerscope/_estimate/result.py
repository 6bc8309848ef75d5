"""What an estimate says: the bytes of a trace of N samples, uncompressed, stored and on
disk, against the disk space free where the store would go."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from layerscope.core import StoreOptions
from layerscope.core.growth import is_token_axis
from layerscope.core.info import human_bytes as _short_bytes
from layerscope.core.lock import holder_document
from layerscope.core.reader import LABELS
from layerscope.core.store import is_local

from .layout import Batches, store_footprint
from .probe import Probe


@dataclass(frozen=True)
class VariableEstimate:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]  # for all N samples
    compressed: bool  # the writer would compress it (decided on the probe)
    raw_bytes: int
    stored_bytes: int  # its folder: chunk files and zarr.json
    coordinate: bool  # a label (batch, token_id, token_text, ...), not a captured tensor


@dataclass(frozen=True)
class Estimate:
    """The size of a trace of ``samples`` samples, from a probe of ``probe_samples``.

    ``raw_bytes``: every array's values, uncompressed; ``stored_bytes``: the bytes of every
    file of the store (chunks, metadata, manifests); ``disk_bytes``: the disk those files and
    folders occupy, each rounded up to whole blocks of the file system, which is what
    ``fits`` compares with ``free_bytes`` (None where the store is not a local folder)."""

    samples: int
    batch_size: int  # samples in the first batch: the chunk sizes follow it
    raw_bytes: int
    stored_bytes: int
    disk_bytes: int
    files: int
    variables: tuple[VariableEstimate, ...]
    #: each token axis's length, and where that length comes from
    token_lengths: dict[str, int]
    token_note: str
    probe_samples: int
    probe_seconds: float
    where: str | None  # the existing folder whose free space was measured
    free_bytes: int | None  # free there, plus what a replaced store (mode 'w') gives back
    replaced_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.disk_bytes <= self.free_bytes

    @property
    def captured(self) -> tuple[VariableEstimate, ...]:
        """The captured variables (what ``layerscope info`` lists), without the labels."""
        return tuple(v for v in self.variables if not v.coordinate)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["fits"] = self.fits
        return doc

    def describe(self, variables: bool = False) -> str:
        """Lines for a person: the sizes, the token length used, the free space."""
        captured = self.captured
        compressed = sum(v.compressed for v in captured)
        lines = [
            f"a trace of {self.samples:,} samples (batches of {self.batch_size}): "
            f"{len(captured)} variables and {len(self.variables) - len(captured)} label arrays, "
            f"{self.files:,} files",
            f"  uncompressed  {human_bytes(self.raw_bytes)}",
            f"  stored        {human_bytes(self.stored_bytes)}  ({compressed} of "
            f"{len(captured)} variables compressed)",
            f"  on disk       {human_bytes(self.disk_bytes)}  (files in whole blocks)",
        ]
        if self.token_lengths:
            lines.append(f"token axes      {_axes(self.token_lengths)}: {self.token_note}")
        if self.free_bytes is None:
            lines.append("free disk       unknown (the store is not a local folder)")
        else:
            given_back = (f", {human_bytes(self.replaced_bytes)} of it the store it replaces"
                          if self.replaced_bytes else "")
            lines.append(f"free disk       {human_bytes(self.free_bytes)} at {self.where}"
                         f"{given_back}")
            lines.append("fits            " + ("yes" if self.fits else
                                               "NO: layerscope trace would refuse to start"))
        plural = self.probe_samples > 1
        lines.append(f"probe           {self.probe_samples} sample{'s' * plural} run once, in "
                     f"memory ({self.probe_seconds:.1f} s); what a compressed array takes per "
                     f"sample is measured on {'them' if plural else 'it'}")
        if variables:
            width = max(len(v.name) for v in self.variables)
            lines += ["", f"{'variable':<{width}}  {'shape':<24} {'stored':>9} {'raw':>9}"]
            for v in sorted(self.variables, key=lambda v: -v.stored_bytes):
                shape = "(" + ", ".join(str(n) for n in v.shape) + ")"
                lines.append(f"{v.name:<{width}}  {shape:<24} {human_bytes(v.stored_bytes):>9} "
                             f"{human_bytes(v.raw_bytes):>9}")
        return "\n".join(lines)


def human_bytes(count: float | None) -> str:
    """Bytes for a person, up to petabytes (an estimate may be asked about any data set)."""
    if count is None or count < 1 << 40:
        return _short_bytes(count)
    terabytes = count / (1 << 40)
    return f"{terabytes:.1f} TB" if terabytes < 1024 else f"{terabytes / 1024:.1f} PB"


def _axes(lengths: dict[str, int]) -> str:
    by_length: dict[int, list[str]] = {}
    for axis, length in lengths.items():
        by_length.setdefault(length, []).append(axis)
    return "; ".join(f"{', '.join(axes)} {length}" for length, axes in by_length.items())


@dataclass(frozen=True)
class DiskSpace:
    where: Path | None
    free: int | None
    block: int
    replaced: int  # what overwriting the store at the path gives back


def disk_space(path: Any, mode: str) -> DiskSpace:
    """Free space at the nearest existing folder of ``path`` (a store that ``mode='w'``
    replaces counts as free), and the file system's block size."""
    if not is_local(path):
        return DiskSpace(None, None, 1, 0)
    target = Path(path).absolute()
    folder = target
    while not folder.is_dir():
        folder = folder.parent
    stats = os.statvfs(folder)
    block = int(stats.f_frsize or stats.f_bsize or 4096)
    replaced = _allocated(target) if mode == "w" and target.is_dir() else 0
    return DiskSpace(folder, int(shutil.disk_usage(folder).free) + replaced, block, replaced)


def _allocated(folder: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def build_estimate(probe: Probe, batches: Batches, options: StoreOptions, path: Any,
                   mode: str, token_note: str) -> Estimate:
    space = disk_space(path, mode)
    lock = len(json.dumps(holder_document())) if space.where is not None else 0
    total, arrays = store_footprint(probe, batches, options.chunks, space.block, lock,
                                    options.gathering)
    samples = batches.samples
    variables = tuple(
        VariableEstimate(a.name, a.dims, (samples, *a.trailing), a.compressed,
                         arrays[a.name].raw, arrays[a.name].stored, a.name in LABELS)
        for a in probe.arrays
    )
    lengths = {}
    for array in probe.arrays:
        for dim, size in zip(array.dims[1:], array.trailing, strict=True):
            if is_token_axis(dim):
                lengths[dim] = size
    return Estimate(
        samples, batches.first, total.raw, total.stored, total.allocated, total.files,
        variables, lengths, token_note if lengths else "", probe.samples, probe.seconds,
        None if space.where is None else str(space.where), space.free, space.replaced,
    )


def refusal(estimate: Estimate, output: Any) -> str:
    """Why ``layerscope trace`` does not start, and what to do."""
    return (
        f"a trace of {estimate.samples:,} samples would take about "
        f"{human_bytes(estimate.disk_bytes)} on disk ({human_bytes(estimate.raw_bytes)} "
        f"uncompressed), but {human_bytes(estimate.free_bytes)} is free at {estimate.where}; "
        f"nothing was written. Free some space, write {output} elsewhere, trace fewer samples "
        "or capture less (--capture, --exclude, --kinds), or pass --force to trace anyway "
        f"(layerscope estimate says what each choice takes)"
    )
