"""Shared pieces of the renderers: figures on the Agg canvas, variable lookup by role, labels.

Renderers never import a framework and never load a whole variable: every helper here narrows
a lazy DataArray with ``.isel`` before asking for values.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.core.errors import LayerscopeError
from layerscope.core.naming import is_capture, parse_variable_name, roles_of

#: Token strings treated as padding (dropped from pictures) and as special tokens (summaries).
PAD_TOKENS = frozenset({"[PAD]", "<pad>", "<PAD>"})
SPECIAL_TOKENS = frozenset({
    "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>",
    "<|endoftext|>", "<bos>", "<eos>", "<|begin_of_text|>", "<|end_of_text|>",
})
FORMATS = (".png", ".svg", ".pdf")
#: resolutions ``save`` accepts: below, text is unreadable; above, one figure takes gigabytes
DPI_RANGE = (10, 1200)
#: the most histogram bins a view draws (more than a figure has pixels across)
MAX_BINS = 10_000


@dataclass(frozen=True)
class ViewOptions:
    """How a view copes with long sequences and wide layers.

    ``window``: (start, stop) token positions to zoom to; None shows the whole (unpadded)
    sequence. Beyond ``max_cells`` positions per axis, maps are block-pooled (max, so sharp
    attention stays visible) and the title says by how much. At most ``max_labels`` token
    labels are drawn per axis (every k-th otherwise, prefixed by its position).
    """

    window: tuple[int, int] | None = None
    max_cells: int = 512
    max_labels: int = 64
    trim_padding: bool = True
    read_workers: int = 2  # chunks decompressed at once: bounds memory on many-core machines

    def __post_init__(self) -> None:
        check_range(self.max_cells, "max_cells", 1)
        check_range(self.max_labels, "max_labels", 1)
        check_range(self.read_workers, "read_workers", 1)
        if self.window is not None:
            if len(self.window) != 2:
                raise RenderError(f"window must be (start, stop), not {self.window!r}")
            start, stop = (check_range(v, "window position", 0) for v in self.window)
            if stop <= start:
                raise RenderError(
                    f"token window {tuple(self.window)} is empty; pass START < STOP"
                )


class RenderError(LayerscopeError):
    """A view cannot be drawn from this trace with these arguments."""


def check_range(value: Any, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int when it is a whole number in ``low..high``; else a RenderError that
    names the argument and the range (instead of a failure deep in NumPy or matplotlib)."""
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f"{low} or more"
        raise RenderError(f"{name} must be a whole number in {allowed}, not {value!r}")
    return int(value)


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas: no display, no pyplot state, inline in notebooks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    class _Figure(Figure):
        # Jupyter shows any object with _repr_png_, whatever matplotlib backend is active.
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", bbox_inches="tight")
            return buffer.getvalue()

    fig = _Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG, SVG or PDF, chosen by the suffix of ``path``; returns the path."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in FORMATS:
        raise RenderError(
            f"cannot write {target}: unknown image format {suffix or '(no suffix)'!r}; "
            "end the file name in .png, .svg or .pdf"
        )
    if not target.parent.is_dir():
        raise RenderError(f"cannot write {target}: folder {target.parent} does not exist")
    if target.is_dir():
        raise RenderError(f"cannot write {target}: it is a folder; give a file name")
    check_range(dpi, "dpi", *DPI_RANGE)
    # the constrained layout already fits the labels: no second, "tight" drawing pass
    fig.savefig(target, format=suffix[1:], dpi=dpi)
    return target


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    check_range(dpi, "dpi", *DPI_RANGE)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def limit_read_threads(workers: int = 2) -> None:
    """Keep the peak memory of drawing from huge traces low, for this whole process.

    A view reads a handful of large chunks (up to 16 MB each). Two things decide how much of
    that memory the process keeps: zarr decodes on a thread pool, and with glibc every thread
    has its own malloc arena holding on to freed chunk buffers. This caps zarr's pool at
    ``workers`` threads (effective when called before zarr first reads) and, on glibc, serves
    buffers of 1 MiB and more with mmap so that a freed chunk goes straight back to the OS.
    The CLI calls it; call it yourself before opening a trace to get the same footprint.
    """
    import ctypes
    import ctypes.util
    import sys

    import zarr

    zarr.config.set({"threading.max_workers": max(1, workers)})
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            pass


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


# -- variables -----------------------------------------------------------------------------


def dim_of(da: Any, role: str) -> str | None:
    """The dim of ``da`` that plays ``role``, or None."""
    for dim, dim_role in zip(da.dims, roles_of(da), strict=True):
        if dim_role == role:
            return str(dim)
    return None


def require_dims(da: Any, name: str, *roles: str) -> dict[str, str]:
    found = {role: dim_of(da, role) for role in roles}
    missing = [role for role, dim in found.items() if dim is None]
    if missing:
        raise RenderError(
            f"{name} has dims {tuple(da.dims)}, not the {', '.join(missing)} this view needs; "
            "pick another variable (layerscope info TRACE lists them)"
        )
    return {role: str(dim) for role, dim in found.items()}


def kind_of(name: str, da: Any) -> str:
    kind = da.attrs.get("kind")
    return str(kind) if kind else parse_variable_name(name).kind


def captures(ds: Any) -> list[str]:
    """Captured variable names in execution order."""
    names = [str(n) for n in ds.data_vars if is_capture(str(n))]
    return sorted(names, key=lambda n: ds[n].attrs.get("order", 1 << 30))


def get_variable(ds: Any, name: str) -> Any:
    if name not in ds.data_vars:
        close = [n for n in captures(ds) if name.split("@")[0] in n][:5]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise RenderError(
            f"no variable {name!r} in this trace.{hint} `layerscope info TRACE` lists them."
        )
    return ds[name]


def check_sample(ds: Any, da: Any, sample: int) -> int:
    batch = dim_of(da, "batch") or "batch"
    size = int(da.sizes.get(batch, ds.sizes.get("batch", 0)))
    if not 0 <= sample < size:
        raise RenderError(
            f"sample {sample} is out of range: the trace holds {size} samples (0..{size - 1})"
        )
    return sample


def check_index(value: int, size: int, what: str, where: str) -> int:
    if not -size <= value < size:
        raise RenderError(
            f"{what} {value} is out of range: {where} has {size} {what}s; pass 0..{size - 1}"
        )
    return value % size


def as_str(values: Any) -> np.ndarray:
    """A fixed-width str array (NumPy's StringDType, as Zarr 3 returns, refuses astype(str))."""
    array = np.asarray(values)
    return np.asarray(array.tolist(), dtype=str).reshape(array.shape)


# -- tokens --------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Token strings as matplotlib text: '$' would start mathtext."""
    return text.replace("$", r"\$")


def real_length(labels: Sequence[str]) -> int:
    """Positions before the trailing padding."""
    end = len(labels)
    while end > 1 and labels[end - 1] in PAD_TOKENS:
        end -= 1
    return end


def label_ticks(axis: Any, labels: Sequence[str], which: str, start: int = 0,
                max_labels: int = 64) -> int:
    """Put token labels on an axis, every ``step``-th when there are too many to read."""
    count = len(labels)
    # all labels when they fit; else every k-th, half as many (tick objects are costly to draw)
    step = 1 if count <= max_labels else int(np.ceil(count / max(1, max_labels // 2)))
    positions = list(range(0, count, step))
    texts = [escape(labels[i]) if step == 1 else f"{start + i}:{escape(labels[i])}"
             for i in positions]
    fontsize = 8 if count <= 32 else 6
    if which == "x":
        axis.set_xticks(positions, texts, rotation=90, fontsize=fontsize)
    else:
        axis.set_yticks(positions, texts, fontsize=fontsize)
    return step


# -- narrowing and pooling -----------------------------------------------------------------


def pool_factor(size: int, max_cells: int) -> int:
    return max(1, int(np.ceil(size / max_cells)))


def pooled_values(da: Any, factors: dict[str, int], how: str = "max",
                  workers: int = 2) -> np.ndarray:
    """Values of a (narrowed, lazy) DataArray, block-pooled along ``factors``.

    Pooling runs on the lazy array, so dask reads ``workers`` chunks at a time and only the
    pooled picture is held in memory.
    """
    active = {dim: f for dim, f in factors.items() if f > 1}
    if active:
        coarse = da.coarsen(active, boundary="pad")
        da = coarse.max() if how == "max" else coarse.mean()
    data = da.data  # the values only: computing the DataArray would load its coordinates too
    if hasattr(data, "dask"):
        return np.asarray(data.compute(num_workers=max(1, workers)))
    return np.asarray(data)
