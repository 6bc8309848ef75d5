"""Per-head summaries of every attention map: entropy, query-key distance and the share of
attention on special tokens, one row per map (named by stack, layer and self / cross)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import SPECIAL_TOKENS, dim_of, new_figure, require_dims
from ._families import (
    attention_type,
    axis_labels,
    color_range,
    describe,
    layer_attr,
    stack_attr,
    token_span,
    write_value,
)
from .attention import ATTENTION_ROLES, _no_attention, attention_variables

TITLES = {"entropy": "entropy (nats)", "distance": "mean distance (tokens)",
          "special": "share on special tokens"}


def head_summary(ds: Any, samples: slice | None = None, stack: str | None = None,
                 attention: str | None = None) -> Any:
    """Per attention map and head, averaged over queries and samples (padding excluded):
    attention entropy (nats), mean query-key distance (positions; NaN for cross-attention,
    whose queries and keys are positions of different sequences) and the share of attention
    on special tokens ([CLS], [SEP], ...).

    Returns an xarray Dataset (variable, head) with coordinates ``layer``, ``stack``,
    ``attention`` and ``label`` (``decoder 1 cross``) along ``variable``; heads a map lacks
    are NaN."""
    import xarray as xr

    names = attention_variables(ds, stack, attention)
    if not names:
        raise _no_attention()
    heads = max(int(ds[n].sizes[dim_of(ds[n], "head")]) for n in names)
    rows: dict[str, list[np.ndarray]] = {key: [] for key in TITLES}
    for name in names:
        for key, value in _layer_head_stats(ds, name, samples).items():
            padded = np.full(heads, np.nan)
            padded[: len(value)] = value
            rows[key].append(padded)
    data = {key: (("variable", "head"), np.stack(values)) for key, values in rows.items()}
    layers = [layer_attr(ds[n]) for n in names]
    out = xr.Dataset(data, coords={
        "variable": names, "head": np.arange(heads),
        "layer": ("variable", [v if v is not None else i for i, v in enumerate(layers)]),
        "stack": ("variable", [stack_attr(ds[n]) or "" for n in names]),
        "attention": ("variable", [attention_type(ds[n]) or "" for n in names]),
        "label": ("variable", [describe(ds[n], i) for i, n in enumerate(names)]),
    })
    out["entropy"].attrs["units"] = "nats"
    out["distance"].attrs["units"] = "token positions"
    return out


def _layer_head_stats(ds: Any, name: str, samples: slice | None) -> dict[str, np.ndarray]:
    """Stream one attention variable sample by sample (bounded memory)."""
    da = ds[name]
    dims = require_dims(da, name, *ATTENTION_ROLES)
    size = int(da.sizes[dims["batch"]])
    indices = range(size)[samples] if samples is not None else range(size)
    heads = int(da.sizes[dims["head"]])
    sums = {key: np.zeros(heads) for key in TITLES}
    across = attention_type(da) == "cross"
    rows = 0
    for sample in indices:
        one = da.isel({dims["batch"]: sample})
        q_labels = axis_labels(ds, dims["query"], sample, int(one.sizes[dims["query"]]))
        k_labels = axis_labels(ds, dims["key"], sample, int(one.sizes[dims["key"]]))
        q0, q1 = token_span(ds, dims["query"], sample, q_labels)
        k0, k1 = token_span(ds, dims["key"], sample, k_labels)
        one = one.isel({dims["query"]: slice(q0, q1), dims["key"]: slice(k0, k1)})
        weights = np.asarray(one.transpose(dims["head"], dims["query"], dims["key"]).values,
                             dtype=np.float64)
        safe = np.where(weights > 0, weights, 1.0)
        sums["entropy"] += -(weights * np.log(safe)).sum(axis=2).sum(axis=1)
        gap = np.abs(np.arange(q0, q1)[:, None] - np.arange(k0, k1)[None, :])
        sums["distance"] += (weights * gap).sum(axis=2).sum(axis=1)
        special = np.array([t in SPECIAL_TOKENS for t in k_labels[k0:k1]], dtype=bool)
        sums["special"] += weights[:, :, special].sum(axis=2).sum(axis=1)
        rows += q1 - q0
    out = {key: value / max(rows, 1) for key, value in sums.items()}
    if across:
        out["distance"] = np.full(heads, np.nan)
    return out


def head_summary_figure(ds: Any, samples: slice | None = None, stack: str | None = None,
                        attention: str | None = None) -> Any:
    """Three map x head heatmaps of :func:`head_summary`."""
    summary = head_summary(ds, samples, stack, attention)
    fig = new_figure(12.0, 0.35 * summary.sizes["variable"] + 2.2)
    axes = fig.subplots(1, 3)
    labels = [str(v) for v in summary["label"].values]
    for ax, (key, title) in zip(axes, TITLES.items(), strict=True):
        values = summary[key].values
        if key == "distance" and np.isnan(values).all(axis=1).any():
            title += "; none for cross-attention"
        vmin, vmax = color_range(values)
        image = ax.imshow(values, cmap="magma", vmin=vmin, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        write_value(ax, values)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("map")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
