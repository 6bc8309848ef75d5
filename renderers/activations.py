"""Activation views: convolution channel maps over the input image, MLP neuron x token
heatmaps and the top-activating tokens of each neuron across the whole trace."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (
    PAD_TOKENS,
    RenderError,
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
    require_dims,
)
from ._families import (
    axis_labels,
    choose,
    color_range,
    describe,
    is_degenerate,
    real_rows,
    sample_texts,
    token_span,
    write_value,
)

CONV_ROLES = ("batch", "channel", "height", "width")
MLP_ROLES = ("batch", "token", "neuron")


def _with_roles(ds: Any, roles: tuple[str, ...], kind: str) -> list[str]:
    names = []
    for name in captures(ds):
        da = ds[name]
        if da.ndim == len(roles) and kind_of(name, da).split(".")[0] == kind and all(
            dim_of(da, r) for r in roles
        ):
            names.append(name)
    return names


def conv_variables(ds: Any) -> list[str]:
    """Outputs with (batch, channel, height, width) dims, in execution order."""
    return _with_roles(ds, CONV_ROLES, "output")


def mlp_variables(ds: Any) -> list[str]:
    """Outputs with (batch, token, neuron) dims (MLP inner activations), in execution order."""
    return _with_roles(ds, MLP_ROLES, "output")


def _pick(ds: Any, candidates: list[str], variable: str | None, layer: int | None,
          what: str, roles: tuple[str, ...], stack: str | None = None) -> str:
    if variable is not None:
        require_dims(get_variable(ds, variable), variable, *roles)
        return variable
    if not candidates:
        raise RenderError(f"this trace holds no {what} (outputs with dims {roles}); "
                          "capture the layers that produce them, or pass --variable NAME")
    # a layer number both stacks of an encoder-decoder share is refused, not guessed
    matching = choose(ds, candidates, what, layer, stack)
    return min(matching, key=lambda n: _preference(ds[n], roles))


def _preference(da: Any, roles: tuple[str, ...]) -> tuple[int, int, int]:
    """Sort key of candidates: the widest neuron axis first (an MLP's inner layer is its
    block's widest (token, neuron) output, wider than the attention projections GPT-2's
    c_attn or Llama's k_proj also give), then the outermost site (the block's own output, not
    an inner projection), then the earliest."""
    width = int(da.sizes[dim_of(da, "neuron")]) if "neuron" in roles else 0
    depth = str(da.attrs.get("site", da.name)).count(".")
    return (-width, depth, int(da.attrs.get("order", 0)))


def _input_image(ds: Any, sample: int, image: str | None) -> np.ndarray | None:
    """The sample's input image (height, width), averaged over its channels."""
    if image is None:
        inputs = _with_roles(ds, CONV_ROLES, "input")
        if not inputs:
            return None
        image = inputs[0]
    da = get_variable(ds, image)
    dims = require_dims(da, image, *CONV_ROLES)
    one = da.isel({dims["batch"]: sample})
    return np.asarray(one.mean(dims["channel"]).transpose(dims["height"], dims["width"]).values)


def channel_grid(ds: Any, variable: str | None = None, sample: int = 0,
                 channels: list[int] | None = None, image: str | None = None,
                 max_channels: int = 16) -> Any:
    """A grid of one convolution's channel maps, each drawn over the input image.

    ``channels`` default: the ``max_channels`` channels most active on this sample (mean
    activation). ``image``: the variable holding the input image; by default the first
    (batch, channel, height, width) input in the trace, if any.
    """
    check_range(max_channels, "max_channels", 1)
    name = _pick(ds, conv_variables(ds), variable, None, "convolution output", CONV_ROLES)
    da = ds[name]
    dims = require_dims(da, name, *CONV_ROLES)
    check_sample(ds, da, sample)
    one = da.isel({dims["batch"]: sample}).transpose(dims["channel"], dims["height"],
                                                     dims["width"])
    total = int(one.sizes[dims["channel"]])
    if channels is None:
        chosen_by = f"the {min(max_channels, total)} most active of {total} channels"
        means = np.asarray(one.mean((dims["height"], dims["width"])).values)
        channels = sorted(np.argsort(-means)[:max_channels].tolist())
    else:
        chosen_by = f"channels {channels}"
        channels = [check_index(c, total, "channel", name) for c in channels]
    maps = np.asarray(one.isel({dims["channel"]: channels}).values)
    shared = color_range(maps)
    picture = _input_image(ds, sample, image)
    cols = min(4, len(channels))
    rows = int(np.ceil(len(channels) / cols))
    fig = new_figure(2.2 * cols, 2.2 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for index, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= len(channels):
            ax.axis("off")
            continue
        height, width = (picture.shape if picture is not None else maps[index].shape)
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        if picture is not None:
            ax.imshow(picture, cmap="gray", extent=extent, interpolation="nearest")
        values = maps[index]
        alpha: Any = 1.0
        if picture is not None:  # opaque where the channel fires, the image shows elsewhere
            span = float(values.max() - values.min()) or 1.0
            alpha = 0.1 + 0.8 * (values - values.min()) / span
        # a pooled 1x1 (or constant) map has no range of its own: it is colored on the
        # range of all the maps drawn, so that its color compares with theirs
        vmin, vmax = shared if is_degenerate(values) else color_range(values)
        ax.imshow(values, cmap="inferno", alpha=alpha, extent=extent, vmin=vmin, vmax=vmax,
                  interpolation="nearest")
        write_value(ax, values, extent)
        ax.set_title(f"channel {channels[index]}", fontsize=8)
    over = " over the input image" if picture is not None else ""
    fig.suptitle(f"{escape(name)}, sample {sample}: {chosen_by}{over}", fontsize=9)
    return fig


def neuron_heatmap(ds: Any, variable: str | None = None, sample: int = 0,
                   layer: int | None = None, neurons: list[int] | None = None,
                   max_neurons: int = 64, stack: str | None = None) -> Any:
    """Neurons (rows) x tokens (columns) of one MLP activation for one sample. By default the
    ``max_neurons`` neurons with the largest |activation| on this sample."""
    check_range(max_neurons, "max_neurons", 1)
    name = _pick(ds, mlp_variables(ds), variable, layer, "MLP activation", MLP_ROLES, stack)
    da = ds[name]
    dims = require_dims(da, name, *MLP_ROLES)
    check_sample(ds, da, sample)
    size = int(da.sizes[dims["token"]])
    labels = axis_labels(ds, dims["token"], sample, size)
    first, stop = token_span(ds, dims["token"], sample, labels)
    real = stop - first  # the sample's own tokens: no padding columns
    one = da.isel({dims["batch"]: sample, dims["token"]: slice(first, stop)})
    one = one.transpose(dims["neuron"], dims["token"])
    total = int(one.sizes[dims["neuron"]])
    values = np.asarray(one.values)
    if neurons is None:
        neurons = sorted(np.argsort(-np.abs(values).max(axis=1))[:max_neurons].tolist())
        chosen_by = f"top {len(neurons)} of {total} neurons by max |activation|"
    else:
        neurons = [check_index(n, total, "neuron", name) for n in neurons]
        chosen_by = f"{len(neurons)} of {total} neurons"
    shown = values[neurons]
    bound = float(np.abs(shown).max()) or 1.0
    fig = new_figure(2.5 + 0.3 * min(real, 64), 1.5 + 0.16 * len(neurons))
    ax = fig.add_subplot()
    extent = (-0.5, real - 0.5, len(neurons) - 0.5, -0.5)
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto",
                      extent=extent, interpolation="nearest")
    write_value(ax, shown, extent)
    label_ticks(ax, labels[first:stop], "x")
    ax.set_yticks(range(len(neurons)), [str(n) for n in neurons], fontsize=6)
    ax.set_ylabel("neuron")
    ax.set_title(f"{escape(name)} ({describe(da)}), sample {sample}: {chosen_by}", fontsize=9)
    fig.colorbar(image, ax=ax, label="activation")
    return fig


def top_tokens(ds: Any, variable: str | None = None, layer: int | None = None,
               k: int = 5, stack: str | None = None) -> Any:
    """For every neuron, the ``k`` (sample, position) pairs where it fires most, across the
    whole trace (padding excluded). Streams the variable one batch chunk at a time.

    Returns an xarray Dataset (neuron, rank) with ``value``, ``sample``, ``position`` and
    ``token`` (the token text, or the position when the trace has none)."""
    import xarray as xr

    check_range(k, "k", 1)
    name = _pick(ds, mlp_variables(ds), variable, layer, "MLP activation", MLP_ROLES, stack)
    da = ds[name]
    dims = require_dims(da, name, *MLP_ROLES)
    da = da.transpose(dims["batch"], dims["token"], dims["neuron"])
    samples, tokens, width = (int(n) for n in da.shape)
    best_value = np.full((width, 0), -np.inf)
    best_flat = np.zeros((width, 0), dtype=np.int64)
    chunk = da.chunksizes.get(dims["batch"], (1,))[0] if da.chunks else 1
    token_dim = dims["token"]
    has_text = sample_texts(ds, token_dim, slice(0, 0)) is not None
    for start in range(0, samples, int(chunk)):
        stop = min(samples, start + int(chunk))
        block = np.asarray(da.isel({dims["batch"]: slice(start, stop)}).values, np.float64)
        text = sample_texts(ds, token_dim, slice(start, stop)) if has_text else None
        if text is not None and text.shape == block.shape[:2]:
            block[np.isin(text, list(PAD_TOKENS))] = -np.inf
        real = real_rows(ds, token_dim, slice(start, stop))
        if real is not None and real.shape == block.shape[:2]:
            block[~real] = -np.inf  # padding, and past a shorter pass's length
        flat = block.reshape(-1, width).T  # (neuron, rows)
        offsets = start * tokens + np.arange(flat.shape[1])
        take = min(k, flat.shape[1])
        part = np.argpartition(-flat, take - 1, axis=1)[:, :take]
        best_value = np.concatenate([best_value, np.take_along_axis(flat, part, 1)], axis=1)
        best_flat = np.concatenate([best_flat, offsets[part]], axis=1)
        keep = np.argsort(-best_value, axis=1, kind="stable")[:, :k]
        best_value = np.take_along_axis(best_value, keep, 1)
        best_flat = np.take_along_axis(best_flat, keep, 1)
    sample_index, position = np.divmod(best_flat, tokens)
    if has_text:
        words = _token_texts(ds, token_dim, sample_index, position)
    else:
        words = position.astype(str)
    return xr.Dataset(
        {"value": (("neuron", "rank"), best_value), "sample": (("neuron", "rank"), sample_index),
         "position": (("neuron", "rank"), position), "token": (("neuron", "rank"), words)},
        coords={"neuron": np.arange(width), "rank": np.arange(best_value.shape[1])},
        attrs={"variable": name},
    )


def _token_texts(ds: Any, token_dim: str, samples: np.ndarray,
                 positions: np.ndarray) -> np.ndarray:
    out = np.empty(samples.shape, dtype=object)
    for sample in np.unique(samples):
        row = np.asarray(axis_labels(ds, token_dim, int(sample), int(ds.sizes[token_dim])))
        mask = samples == sample
        out[mask] = row[positions[mask]]
    return out.astype(str)


def top_tokens_figure(ds: Any, variable: str | None = None, layer: int | None = None,
                      k: int = 5, neurons: list[int] | None = None, count: int = 16,
                      stack: str | None = None) -> Any:
    """A table of the top tokens per neuron (rows: the ``count`` neurons with the largest
    maximum over the trace, unless ``neurons`` names them), colored by activation."""
    check_range(count, "count", 1)
    table = top_tokens(ds, variable, layer, k, stack)
    if neurons is None:
        neurons = np.argsort(-table["value"].values[:, 0])[:count].tolist()
    values = table["value"].values[neurons]
    words = table["token"].values[neurons]
    fig = new_figure(1.6 * values.shape[1] + 1.5, 0.32 * len(neurons) + 1.2)
    ax = fig.add_subplot()
    finite = np.where(np.isfinite(values), values, np.nan)
    vmin, vmax = color_range(finite)
    ax.imshow(finite, cmap="Oranges", vmin=vmin, vmax=vmax, aspect="auto")
    for row in range(values.shape[0]):
        for col in range(values.shape[1]):
            ax.text(col, row, f"{escape(words[row, col])} ({values[row, col]:.2f})",
                    ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(neurons)), [str(n) for n in neurons], fontsize=7)
    ax.set_ylabel("neuron")
    ax.set_xticks(range(values.shape[1]), [f"#{i + 1}" for i in range(values.shape[1])])
    ax.set_title(f"top tokens per neuron across the trace: {escape(table.attrs['variable'])}",
                 fontsize=9)
    return fig
