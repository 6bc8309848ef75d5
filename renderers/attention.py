"""Attention views: one head's heatmap, the map x head grid and the head view (token-to-token
lines). Maps are drawn whole whatever their shape (a decoder's cross-attention is decoder
tokens x encoder tokens), each axis labeled by its own tokens; per-head summaries live in
:mod:`.attention_summary`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from layerscope.core.naming import token_axis_of

from ._common import (
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
    require_dims,
)
from ._families import (
    axis_labels,
    choose,
    color_range,
    describe,
    generated_from,
    layer_attr,
    token_span,
    write_value,
)

ATTENTION_ROLES = ("batch", "head", "query", "key")
WHAT = "attention map"


def attention_variables(ds: Any, stack: str | None = None,
                        attention: str | None = None) -> list[str]:
    """Attention-probability variables (kind ``attention``) in execution order, of one
    ``stack`` (``encoder`` / ``decoder``) and ``attention`` type (``self`` / ``cross``) when
    given."""
    names = []
    for name in captures(ds):
        da = ds[name]
        if kind_of(name, da).split(".")[0] == "attention" and all(
            dim_of(da, role) for role in ATTENTION_ROLES
        ):
            names.append(name)
    if names and (stack is not None or attention is not None):
        names = choose(ds, names, WHAT, None, stack, attention)
    return names


def _no_attention() -> RenderError:
    return RenderError(
        "this trace holds no attention probabilities (no '<site>@attention' variable); "
        "capture again with kinds including 'attention' on the attention modules"
    )


def select_attention(ds: Any, layer: int | None = None, variable: str | None = None,
                     stack: str | None = None, attention: str | None = None) -> str:
    """The attention variable named ``variable``, else the one of block ``layer`` (attrs
    ``layer``, within ``stack`` and of ``attention`` type; the N-th attention variable when
    blocks are unnumbered), else the first. A layer number two stacks share, or a decoder
    layer's self- and cross-attention, is refused unless ``stack`` / ``attention`` decide."""
    if variable is not None:
        da = get_variable(ds, variable)
        require_dims(da, variable, *ATTENTION_ROLES)
        return variable
    names = attention_variables(ds)
    if not names:
        raise _no_attention()
    if layer is not None and all(layer_attr(ds[n]) is None for n in names):
        if not 0 <= layer < len(names):  # unnumbered blocks: the N-th map
            raise RenderError(f"no {WHAT} for layer {layer}; this trace has layers "
                              f"{list(range(len(names)))}. Pass one of those, or --variable NAME")
        return names[layer]
    return choose(ds, names, WHAT, layer, stack, attention)[0]


@dataclass(frozen=True)
class MapWindow:
    """One sample's lazy (head, query, key) map, cut to the unpadded window of each axis,
    with each axis's token labels and first position."""

    data: Any
    head: str
    query: str
    key: str
    query_labels: list[str]
    key_labels: list[str]
    query_start: int
    key_start: int

    @property
    def square_tokens(self) -> bool:
        return (self.query_labels, self.query_start) == (self.key_labels, self.key_start)

    def span(self) -> str:
        q = f"{self.query_start}..{self.query_start + len(self.query_labels) - 1}"
        if self.square_tokens:
            return f"tokens {q}"
        k = f"{self.key_start}..{self.key_start + len(self.key_labels) - 1}"
        return f"queries {q}, keys {k}"

    def extent(self) -> tuple[float, float, float, float]:
        """Image extent: one unit per token position on each axis, queries downwards."""
        return (-0.5, len(self.key_labels) - 0.5, len(self.query_labels) - 0.5, -0.5)


def _axis_window(labels: list[str], opts: ViewOptions, dim: str,
                 real: tuple[int, int]) -> tuple[int, int]:
    """``real``: the sample's own tokens along ``dim`` (:func:`token_span`)."""
    start, stop = real if opts.trim_padding else (0, len(labels))
    if opts.window is not None:
        start, stop = max(start, opts.window[0]), min(stop, opts.window[1])
        if stop <= start:
            raise RenderError(
                f"token window {opts.window} is empty on {dim}: it has {stop} positions "
                "(padding excluded); pass START < STOP inside it"
            )
    return start, stop


def narrow_map(ds: Any, name: str, sample: int, opts: ViewOptions) -> MapWindow:
    """The lazy (head, query, key) map of one sample, each axis cut to its unpadded window."""
    da = ds[name]
    dims = require_dims(da, name, *ATTENTION_ROLES)
    check_sample(ds, da, sample)
    da = da.isel({dims["batch"]: sample}).transpose(dims["head"], dims["query"], dims["key"])
    q_dim, k_dim = dims["query"], dims["key"]
    q_labels = axis_labels(ds, q_dim, sample, int(da.sizes[q_dim]))
    same_axis = (token_axis_of(q_dim), da.sizes[q_dim]) == (token_axis_of(k_dim), da.sizes[k_dim])
    # a self-attention's keys are its queries: their labels are read once
    k_labels = q_labels if same_axis else axis_labels(ds, k_dim, sample, int(da.sizes[k_dim]))
    q_real = token_span(ds, q_dim, sample, q_labels)
    k_real = q_real if same_axis else token_span(ds, k_dim, sample, k_labels)
    q_start, q_stop = _axis_window(q_labels, opts, q_dim, q_real)
    k_start, k_stop = _axis_window(k_labels, opts, k_dim, k_real)
    da = da.isel({q_dim: slice(q_start, q_stop), k_dim: slice(k_start, k_stop)})
    return MapWindow(da, dims["head"], q_dim, k_dim, q_labels[q_start:q_stop],
                     k_labels[k_start:k_stop], q_start, k_start)


def axis_title(role: str, dim: str) -> str:
    """``key`` / ``query``, with the stack's tokens named where they are the decoder's."""
    return f"{role} (decoder tokens)" if dim.startswith("decoder_") else role


def attention_heatmap(ds: Any, layer: int | None = None, head: int = 0, sample: int = 0,
                      variable: str | None = None, options: ViewOptions | None = None,
                      stack: str | None = None, attention: str | None = None) -> Any:
    """One head's attention map (query rows, key columns), token labels on both axes."""
    opts = options or ViewOptions()
    name = select_attention(ds, layer, variable, stack, attention)
    window = narrow_map(ds, name, sample, opts)
    heads = int(window.data.sizes[window.head])
    head = check_index(head, heads, "head", name)
    one = window.data.isel({window.head: head})
    rows, cols = len(window.query_labels), len(window.key_labels)
    q_factor, k_factor = pool_factor(rows, opts.max_cells), pool_factor(cols, opts.max_cells)
    values = pooled_values(one, {window.query: q_factor, window.key: k_factor},
                           workers=opts.read_workers)

    size = min(8.0, 3.0 + 0.2 * min(max(rows, cols), opts.max_labels))
    fig = new_figure(size * min(1.6, max(0.8, cols / max(rows, 1))) + 1.2, size)
    ax = fig.add_subplot()
    vmin, vmax = color_range(values, low=0.0)
    extent = window.extent()
    image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, extent=extent,
                      aspect="auto", interpolation="nearest")
    write_value(ax, values, extent)
    label_ticks(ax, window.key_labels, "x", window.key_start, opts.max_labels)
    label_ticks(ax, window.query_labels, "y", window.query_start, opts.max_labels)
    ax.set_xlabel(axis_title("key", window.key))
    ax.set_ylabel(axis_title("query", window.query))
    notes = [window.span()]
    if _mark_generated(ax, ds, window, sample):
        notes.append("generated after the dashed line")
    if q_factor > 1 or k_factor > 1:
        notes.append(f"max-pooled {q_factor}x{k_factor}")
    ax.set_title(f"{escape(name)}\n{describe(ds[name])}, head {head}, sample {sample} "
                 f"({', '.join(notes)})", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention")
    return fig


def _mark_generated(ax: Any, ds: Any, window: MapWindow, sample: int) -> bool:
    """A dashed line before the first generated position on each axis that has one in view
    (a traced ``generate()``): prompt above and left of it, generated text after."""
    marked = False
    for dim, start, count, line in ((window.query, window.query_start,
                                     len(window.query_labels), ax.axhline),
                                    (window.key, window.key_start, len(window.key_labels),
                                     ax.axvline)):
        first = generated_from(ds, dim, sample)
        if first is not None and start < first < start + count:
            line(first - start - 0.5, color="white", linestyle="--", linewidth=1.0)
            marked = True
    return marked


def attention_grid(ds: Any, sample: int = 0, options: ViewOptions | None = None,
                   max_heads: int = 16, stack: str | None = None,
                   attention: str | None = None) -> Any:
    """The model view: one small map per attention variable (rows, named by stack, layer
    and self / cross) and head (columns)."""
    check_range(max_heads, "max_heads", 1)
    opts = options or ViewOptions(max_cells=64)
    names = attention_variables(ds, stack, attention)
    if not names:
        raise _no_attention()
    totals = [int(ds[n].sizes[dim_of(ds[n], "head")]) for n in names]
    heads = min(max(totals), max_heads)
    fig = new_figure(1.3 * heads + 1.2, 1.3 * len(names) + 0.8)
    axes = fig.subplots(len(names), heads, squeeze=False)
    shapes, pooled, marked = set(), 1, False
    for row, name in enumerate(names):
        window = narrow_map(ds, name, sample, opts)
        rows, cols = len(window.query_labels), len(window.key_labels)
        shapes.add((rows, cols))
        q_factor, k_factor = pool_factor(rows, opts.max_cells), pool_factor(cols, opts.max_cells)
        pooled = max(pooled, q_factor, k_factor)
        shown = min(heads, totals[row])
        # One read per map: chunks hold all heads of a query block.
        values = pooled_values(window.data.isel({window.head: slice(0, shown)}),
                               {window.query: q_factor, window.key: k_factor},
                               workers=opts.read_workers)
        extent = window.extent()
        for col in range(heads):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < shown:
                vmin, vmax = color_range(values[col], low=0.0)
                ax.imshow(values[col], cmap="viridis", vmin=vmin, vmax=vmax, extent=extent,
                          interpolation="nearest")
                write_value(ax, values[col], extent)
                marked = _mark_generated(ax, ds, window, sample) or marked
            else:
                ax.axis("off")
            if row == 0:
                ax.set_title(f"head {col}", fontsize=8)
            if col == 0:
                ax.set_ylabel(describe(ds[name], row), fontsize=8)
    total = max(totals)
    cut = f"first {heads} of {total} heads, " if heads < total else ""
    if len(shapes) == 1:
        (rows, cols), = shapes
        size = f"{rows} tokens" if rows == cols else f"{rows} x {cols} tokens"
    else:
        size = "each map whole"
    note = f", max-pooled {pooled}x{pooled}" if pooled > 1 else ""
    note += ", generated after the dashed lines" if marked else ""
    fig.suptitle(f"attention, maps x heads, sample {sample} ({cut}{size}{note})", fontsize=10)
    return fig


def head_view(ds: Any, layer: int | None = None, sample: int = 0, heads: list[int] | None = None,
              variable: str | None = None, options: ViewOptions | None = None,
              stack: str | None = None, attention: str | None = None) -> Any:
    """Token-to-token lines (query on the left, key on the right), width and opacity by
    attention, one color per head (BertViz's head view, static)."""
    opts = options or ViewOptions(max_cells=64)
    name = select_attention(ds, layer, variable, stack, attention)
    if opts.window is None:
        opts = ViewOptions(window=(0, opts.max_cells), max_cells=opts.max_cells,
                           max_labels=opts.max_labels, trim_padding=opts.trim_padding)
    window = narrow_map(ds, name, sample, opts)
    total = int(window.data.sizes[window.head])
    chosen = [check_index(h, total, "head", name) for h in (heads or [0])]
    values = np.asarray(window.data.isel({window.head: chosen}).values)
    rows, cols = len(window.query_labels), len(window.key_labels)
    fig = new_figure(5.0, max(3.0, 0.25 * max(rows, cols) + 1.0))
    ax = fig.add_subplot()
    colors = _head_colors(len(chosen))
    for index, head in enumerate(chosen):
        weights = values[index]
        for q in range(rows):
            for k in range(cols):
                w = float(weights[q, k])
                if w < 0.02:
                    continue  # invisible anyway; keeps vector output small
                ax.plot([0.0, 1.0], [q, k], color=colors[index], alpha=min(1.0, w),
                        linewidth=0.3 + 2.5 * w)
        ax.plot([], [], color=colors[index], label=f"head {head}")
    for i, text in enumerate(window.query_labels):
        ax.text(-0.02, i, escape(text), ha="right", va="center", fontsize=8)
    for i, text in enumerate(window.key_labels):
        ax.text(1.02, i, escape(text), ha="left", va="center", fontsize=8)
    generated = _mark_generated_tokens(ax, ds, window, sample)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(max(rows, cols) - 0.5, -0.5)
    ax.axis("off")
    ax.legend(loc="lower center", fontsize=7, ncol=min(4, len(chosen)), frameon=False,
              bbox_to_anchor=(0.5, -0.08))
    ax.set_title(f"{escape(name)}\n{describe(ds[name])}, sample {sample}, {window.span()}"
                 f"{', generated after the dashed line' if generated else ''}\n"
                 f"{axis_title('query', window.query)} (left) -> "
                 f"{axis_title('key', window.key)} (right)", fontsize=8)
    return fig


def _mark_generated_tokens(ax: Any, ds: Any, window: MapWindow, sample: int) -> bool:
    """The head view's mark of a traced ``generate()``: a dashed line under the last prompt
    token of each column (queries left, keys right) that has generated tokens in view."""
    marked = False
    for dim, start, count, (left, right) in ((window.query, window.query_start,
                                              len(window.query_labels), (-0.6, -0.01)),
                                             (window.key, window.key_start,
                                              len(window.key_labels), (1.01, 1.6))):
        first = generated_from(ds, dim, sample)
        if first is not None and start < first < start + count:
            ax.plot([left, right], [first - start - 0.5] * 2, color="gray", linestyle="--",
                    linewidth=1.0)
            marked = True
    return marked


def _head_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]
