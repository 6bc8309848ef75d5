"""Distributions: per-variable summary statistics and histograms, computed chunk by chunk
(one stored chunk in memory at a time), with variables holding NaN or Inf flagged."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerscope.core.samples import real_tokens

from ._common import MAX_BINS, RenderError, captures, check_range, escape, get_variable, new_figure


@dataclass
class Moments:
    """Running statistics merged chunk by chunk (Chan et al.'s parallel variance)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    minimum: float = np.inf
    maximum: float = -np.inf
    nan: int = 0
    inf: int = 0
    size: int = 0

    def add(self, block: np.ndarray) -> None:
        values = np.asarray(block, dtype=np.float64).ravel()
        self.size += values.size
        nan = np.isnan(values)
        inf = np.isinf(values)
        self.nan += int(nan.sum())
        self.inf += int(inf.sum())
        finite = values[~(nan | inf)]
        if not finite.size:
            return
        n, mean = finite.size, float(finite.mean())
        m2 = float(((finite - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.minimum = min(self.minimum, float(finite.min()))
        self.maximum = max(self.maximum, float(finite.max()))

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")


def chunks_of(da: Any, ds: Any = None) -> Iterator[np.ndarray]:
    """The values of ``da`` one stored chunk at a time, only where its token axes hold real
    tokens of the sample (:func:`layerscope.core.samples.real_tokens`): padding and the fill
    values past a shorter pass's length are no values of the model's."""
    data = da.data
    keep = real_tokens(da, ds)
    real = None if keep is None else keep.broadcast_like(da).transpose(*da.dims).data
    if not hasattr(data, "blocks"):  # an in-memory array: one block
        values = np.asarray(data)
        yield values if real is None else values[np.asarray(real)]
        return
    if real is not None:
        import dask.array

        real = dask.array.asarray(real).rechunk(data.chunks)
    for index in np.ndindex(*data.numblocks):
        values = np.asarray(data.blocks[index].compute())
        yield values if real is None else values[np.asarray(real.blocks[index].compute())]


def _numeric(ds: Any, names: Sequence[str] | None) -> list[str]:
    chosen = list(names) if names is not None else captures(ds)
    for name in chosen:
        get_variable(ds, name)
    return [n for n in chosen if np.dtype(ds[n].dtype).kind in "fiub"]


def layer_stats(ds: Any, names: Sequence[str] | None = None) -> Any:
    """count, mean, std, min, max (of finite values), NaN and Inf counts and a ``flagged``
    marker per variable, as an xarray Dataset indexed by ``variable``."""
    import xarray as xr

    rows = []
    names = _numeric(ds, names)
    for name in names:
        moments = Moments()
        for block in chunks_of(ds[name], ds):
            moments.add(block)
        rows.append(moments)
    columns: dict[str, Any] = {
        "count": [m.count for m in rows], "mean": [m.mean if m.count else np.nan for m in rows],
        "std": [m.std for m in rows], "min": [m.minimum if m.count else np.nan for m in rows],
        "max": [m.maximum if m.count else np.nan for m in rows], "nan": [m.nan for m in rows],
        "inf": [m.inf for m in rows], "size": [m.size for m in rows],
    }
    data = {key: ("variable", np.asarray(value)) for key, value in columns.items()}
    data["flagged"] = ("variable", np.asarray([m.nan + m.inf > 0 for m in rows], dtype=bool))
    return xr.Dataset(data, coords={"variable": names})


@dataclass(frozen=True)
class Histogram:
    edges: np.ndarray
    counts: np.ndarray
    nan: int
    inf: int

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.nan + self.inf


def histogram(da: Any, bins: int = 50, value_range: tuple[float, float] | None = None) -> Histogram:
    """Histogram of the finite values of ``da`` (two chunked passes when no range is given:
    min/max, then counts), with NaN and Inf counted apart."""
    check_range(bins, "bins", 1, MAX_BINS)
    if value_range is None:
        moments = Moments()
        for block in chunks_of(da):
            moments.add(block)
        low, high = (moments.minimum, moments.maximum) if moments.count else (0.0, 1.0)
    else:
        low, high = value_range
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    nan = inf = 0
    for block in chunks_of(da):
        values = np.asarray(block, dtype=np.float64).ravel()
        is_nan, is_inf = np.isnan(values), np.isinf(values)
        nan += int(is_nan.sum())
        inf += int(is_inf.sum())
        counts += np.histogram(values[~(is_nan | is_inf)], bins=edges)[0]
    return Histogram(edges, counts, nan, inf)


def default_variables(ds: Any, limit: int = 24) -> list[str]:
    """The residual stream when there is one (each stack's, encoder first, in an
    encoder-decoder trace), else the first ``limit`` numeric captures."""
    from layerscope.core.naming import STACKS

    from .hidden import block_outputs

    for stacks in ((None,), STACKS):
        streams = []
        for stack in stacks:
            try:
                streams += list(block_outputs(ds, stack=stack).names)
            except RenderError:
                continue
        if streams:
            return streams
    return _numeric(ds, None)[:limit]


def distributions(ds: Any, names: Sequence[str] | None = None, bins: int = 50) -> Any:
    """Small multiples: a histogram per variable (log counts), titled with its statistics;
    variables holding NaN or Inf are titled in red with their counts."""
    check_range(bins, "bins", 1, MAX_BINS)
    names = list(names) if names is not None else default_variables(ds)
    names = _numeric(ds, names)
    if not names:
        raise RenderError("no numeric captured variables to draw")
    stats = layer_stats(ds, names)
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig = new_figure(3.2 * cols, 2.4 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for index, ax in enumerate(axes.ravel()):
        if index >= len(names):
            ax.axis("off")
            continue
        name = names[index]
        row = stats.sel(variable=name)
        value_range = (float(row["min"]), float(row["max"])) if int(row["count"]) else None
        hist = histogram(ds[name], bins, value_range)
        ax.stairs(hist.counts, hist.edges, fill=True, color="tab:blue")
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
        title = (f"{escape(name)}\nmean {float(row['mean']):.3g} std {float(row['std']):.3g}\n"
                 f"min {float(row['min']):.3g} max {float(row['max']):.3g}")
        flagged = bool(row["flagged"])
        if flagged:
            title += f"\nNaN {int(row['nan'])}  Inf {int(row['inf'])}"
        ax.set_title(title, fontsize=7, color="red" if flagged else "black")
    fig.suptitle("value distributions (finite values; NaN / Inf counted apart)", fontsize=9)
    return fig
