"""Attention views: one head's heatmap, the layer x head grid, the head view (token-to-token
lines) and per-head summaries (entropy, distance, attention to special tokens)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    SPECIAL_TOKENS,
    RenderError,
    ViewOptions,
    captures,
    check_index,
    check_range,
    check_sample,
    dim_of,
    escape,
    get_variable,
    kind_of,
    label_ticks,
    new_figure,
    pool_factor,
    pooled_values,
    real_length,
    require_dims,
    token_labels,
)

ATTENTION_ROLES = ("batch", "head", "query", "key")


def attention_variables(ds: Any) -> list[str]:
    """Attention-probability variables (kind ``attention``) in execution order."""
    names = []
    for name in captures(ds):
        da = ds[name]
        if kind_of(name, da).split(".")[0] == "attention" and all(
            dim_of(da, role) for role in ATTENTION_ROLES
        ):
            names.append(name)
    return names


def _layer_of(ds: Any, name: str, position: int) -> int:
    layer = ds[name].attrs.get("layer")
    return int(layer) if layer is not None else position


def select_attention(ds: Any, layer: int | None = None, variable: str | None = None) -> str:
    """The attention variable named ``variable``, else the one of block ``layer`` (attrs
    ``layer``; the N-th attention variable when blocks are unnumbered), else the first."""
    if variable is not None:
        da = get_variable(ds, variable)
        require_dims(da, variable, *ATTENTION_ROLES)
        return variable
    names = attention_variables(ds)
    if not names:
        raise RenderError(
            "this trace holds no attention probabilities (no '<site>@attention' variable); "
            "capture again with kinds including 'attention' on the attention modules"
        )
    if layer is None:
        return names[0]
    by_layer = [n for i, n in enumerate(names) if _layer_of(ds, n, i) == layer]
    if by_layer:
        return by_layer[0]
    layers = sorted({_layer_of(ds, n, i) for i, n in enumerate(names)})
    raise RenderError(
        f"no attention variable for layer {layer}; this trace has layers {layers}. "
        "Pass one of those, or --variable NAME"
    )


def _narrow(ds: Any, name: str, sample: int, opts: ViewOptions) -> tuple[Any, list[str], int]:
    """The lazy (head, query, key) map of one sample, cut to the unpadded window."""
    da = ds[name]
    dims = require_dims(da, name, *ATTENTION_ROLES)
    check_sample(ds, da, sample)
    da = da.isel({dims["batch"]: sample})
    size = int(da.sizes[dims["query"]])
    labels = token_labels(ds, sample, size)
    stop = real_length(labels) if opts.trim_padding else size
    start = 0
    if opts.window is not None:
        start, stop = max(0, opts.window[0]), min(stop, opts.window[1])
        if stop <= start:
            raise RenderError(
                f"token window {opts.window} is empty: the sequence has {stop} positions "
                "(padding excluded); pass START < STOP inside it"
            )
    window = slice(start, stop)
    da = da.isel({dims["query"]: window, dims["key"]: window})
    return da, labels[start:stop], start


def attention_heatmap(ds: Any, layer: int | None = None, head: int = 0, sample: int = 0,
                      variable: str | None = None, options: ViewOptions | None = None) -> Any:
    """One head's attention map (query rows, key columns), token labels on both axes."""
    opts = options or ViewOptions()
    name = select_attention(ds, layer, variable)
    da, labels, start = _narrow(ds, name, sample, opts)
    head_dim, q_dim, k_dim = (dim_of(da, r) for r in ("head", "query", "key"))
    heads = int(da.sizes[head_dim])
    head = check_index(head, heads, "head", name)
    one = da.isel({head_dim: head})
    count = len(labels)
    factor = pool_factor(count, opts.max_cells)
    values = pooled_values(one, {str(q_dim): factor, str(k_dim): factor},
                           workers=opts.read_workers)

    size = min(8.0, 3.0 + 0.2 * min(count, opts.max_labels))
    fig = new_figure(size + 1.2, size)
    ax = fig.add_subplot()
    extent = (-0.5, count - 0.5, count - 0.5, -0.5)
    image = ax.imshow(values, cmap="viridis", vmin=0.0, extent=extent, aspect="auto",
                      interpolation="nearest")
    label_ticks(ax, labels, "x", start, opts.max_labels)
    label_ticks(ax, labels, "y", start, opts.max_labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    layer_attr = ds[name].attrs.get("layer")
    notes = [f"tokens {start}..{start + count - 1}"]
    if factor > 1:
        notes.append(f"max-pooled {factor}x{factor}")
    ax.set_title(
        f"{escape(name)}\nlayer {layer_attr if layer_attr is not None else '?'}, head {head}, "
        f"sample {sample} ({', '.join(notes)})", fontsize=9,
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention")
    return fig


def attention_grid(ds: Any, sample: int = 0, options: ViewOptions | None = None,
                   max_heads: int = 16) -> Any:
    """The model view: one small map per layer (rows) and head (columns)."""
    check_range(max_heads, "max_heads", 1)
    opts = options or ViewOptions(max_cells=64)
    names = attention_variables(ds)
    if not names:
        select_attention(ds)  # raises the explanatory error
    first = ds[names[0]]
    heads = min(int(first.sizes[dim_of(first, "head")]), max_heads)
    fig = new_figure(1.3 * heads + 0.8, 1.3 * len(names) + 0.8)
    axes = fig.subplots(len(names), heads, squeeze=False)
    count = 0
    for row, name in enumerate(names):
        da, labels, start = _narrow(ds, name, sample, opts)
        count = len(labels)
        head_dim, q_dim, k_dim = (str(dim_of(da, r)) for r in ("head", "query", "key"))
        factor = pool_factor(count, opts.max_cells)
        # One read per layer: chunks hold all heads of a query block.
        values = pooled_values(da.isel({head_dim: slice(0, heads)}),
                               {q_dim: factor, k_dim: factor}, workers=opts.read_workers)
        for col in range(heads):
            ax = axes[row, col]
            ax.imshow(values[col], cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {col}", fontsize=8)
            if col == 0:
                layer = ds[name].attrs.get("layer", row)
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    total = int(first.sizes[dim_of(first, "head")])
    shown = f"first {heads} of {total} heads, " if heads < total else ""
    pooled = pool_factor(count, opts.max_cells)
    note = f", max-pooled {pooled}x{pooled}" if pooled > 1 else ""
    fig.suptitle(f"attention, layers x heads, sample {sample} ({shown}{count} tokens{note})",
                 fontsize=10)
    return fig


def head_view(ds: Any, layer: int | None = None, sample: int = 0, heads: list[int] | None = None,
              variable: str | None = None, options: ViewOptions | None = None) -> Any:
    """Token-to-token lines (query on the left, key on the right), width and opacity by
    attention, one color per head (BertViz's head view, static)."""
    opts = options or ViewOptions(max_cells=64)
    name = select_attention(ds, layer, variable)
    if opts.window is None:
        opts = ViewOptions(window=(0, opts.max_cells), max_cells=opts.max_cells,
                           max_labels=opts.max_labels, trim_padding=opts.trim_padding)
    da, labels, start = _narrow(ds, name, sample, opts)
    head_dim = str(dim_of(da, "head"))
    total = int(da.sizes[head_dim])
    chosen = [check_index(h, total, "head", name) for h in (heads or [0])]
    values = np.asarray(da.isel({head_dim: chosen}).values)
    count = len(labels)
    fig = new_figure(5.0, max(3.0, 0.25 * count + 1.0))
    ax = fig.add_subplot()
    colors = _head_colors(len(chosen))
    for index, head in enumerate(chosen):
        weights = values[index]
        for q in range(count):
            for k in range(count):
                w = float(weights[q, k])
                if w < 0.02:
                    continue  # invisible anyway; keeps vector output small
                ax.plot([0.0, 1.0], [q, k], color=colors[index], alpha=min(1.0, w),
                        linewidth=0.3 + 2.5 * w)
        ax.plot([], [], color=colors[index], label=f"head {head}")
    for i, text in enumerate(labels):
        ax.text(-0.02, i, escape(text), ha="right", va="center", fontsize=8)
        ax.text(1.02, i, escape(text), ha="left", va="center", fontsize=8)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(count - 0.5, -0.5)
    ax.axis("off")
    ax.legend(loc="lower center", fontsize=7, ncol=min(4, len(chosen)), frameon=False,
              bbox_to_anchor=(0.5, -0.08))
    ax.set_title(f"{escape(name)}, sample {sample}\nquery (left) -> key (right), tokens "
                 f"{start}..{start + count - 1}", fontsize=9)
    return fig


def _head_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def head_summary(ds: Any, samples: slice | None = None) -> Any:
    """Per layer and head, averaged over queries and samples (padding excluded): attention
    entropy (nats), mean query-key distance (positions) and the share of attention on special
    tokens ([CLS], [SEP], ...). Returns an xarray Dataset (layer, head)."""
    import xarray as xr

    names = attention_variables(ds)
    if not names:
        select_attention(ds)
    rows: dict[str, list[np.ndarray]] = {"entropy": [], "distance": [], "special": []}
    for name in names:
        stats = _layer_head_stats(ds, name, samples)
        for key, value in stats.items():
            rows[key].append(value)
    layers = [int(ds[n].attrs.get("layer", i)) for i, n in enumerate(names)]
    heads = int(ds[names[0]].sizes[dim_of(ds[names[0]], "head")])
    data = {
        key: (("layer", "head"), np.stack(values)) for key, values in rows.items()
    }
    out = xr.Dataset(data, coords={"layer": layers, "head": np.arange(heads),
                                   "variable": ("layer", names)})
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
    sums = {key: np.zeros(heads) for key in ("entropy", "distance", "special")}
    rows = 0
    for sample in indices:
        one = da.isel({dims["batch"]: sample})
        length = int(one.sizes[dims["query"]])
        labels = token_labels(ds, sample, length)
        real = real_length(labels)
        one = one.isel({dims["query"]: slice(0, real), dims["key"]: slice(0, real)})
        weights = np.asarray(one.transpose(dims["head"], dims["query"], dims["key"]).values,
                             dtype=np.float64)
        safe = np.where(weights > 0, weights, 1.0)
        sums["entropy"] += -(weights * np.log(safe)).sum(axis=2).sum(axis=1)
        positions = np.arange(real)
        gap = np.abs(positions[:, None] - positions[None, :])
        sums["distance"] += (weights * gap).sum(axis=2).sum(axis=1)
        special = np.array([t in SPECIAL_TOKENS for t in labels[:real]])
        sums["special"] += weights[:, :, special].sum(axis=2).sum(axis=1)
        rows += real
    return {key: value / max(rows, 1) for key, value in sums.items()}


def head_summary_figure(ds: Any, samples: slice | None = None) -> Any:
    """Three layer x head heatmaps of :func:`head_summary`."""
    summary = head_summary(ds, samples)
    fig = new_figure(12.0, 0.35 * summary.sizes["layer"] + 2.2)
    axes = fig.subplots(1, 3)
    titles = {"entropy": "entropy (nats)", "distance": "mean distance (tokens)",
              "special": "share on special tokens"}
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        values = summary[key].values
        image = ax.imshow(values, cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(summary.layer)), [str(v) for v in summary.layer.values])
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
