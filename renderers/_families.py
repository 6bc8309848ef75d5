"""What every view needs to draw any model family right: the labels of each token axis
(encoder and decoder tokens apart), the stack / layer / self-or-cross a variable belongs to,
choosing variables by them, and color ranges that stay readable on degenerate maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from layerscope.core.naming import STACKS, token_axis_of
from layerscope.core.samples import mask_name

from ._common import RenderError, as_str, dim_of, escape, real_length

ATTENTION_TYPES = ("self", "cross")


# -- labels of token axes -------------------------------------------------------------------


def text_of(dim: str) -> str | None:
    """The coordinate holding the token strings of ``dim`` (``decoder_query`` ->
    ``decoder_token_text``, ``key`` -> ``token_text``), None for non-token dims."""
    axis = token_axis_of(dim)
    return f"{axis}_text" if axis else None


def axis_labels(ds: Any, dim: str, sample: int, size: int) -> list[str]:
    """The token strings along ``dim`` for one sample; positions when the trace has none
    (or they are of another length, e.g. a pooled or resized axis)."""
    name = text_of(dim)
    if name is not None and name in ds.variables:
        text = ds[name]
        axis = str(text.dims[-1])
        if int(text.sizes[axis]) == size:
            return [str(t) for t in as_str(text.isel(batch=sample).values)]
    return [str(i) for i in range(size)]


def token_span(ds: Any, dim: str, sample: int, labels: Sequence[str]) -> tuple[int, int]:
    """(start, stop) of one sample's real tokens along ``dim``: from its token mask (left or
    right padding, a pass shorter than the longest stored), else the positions before the
    trailing padding tokens of ``labels``."""
    name = mask_name(ds, dim)
    if name is not None:
        real = np.flatnonzero(np.asarray(ds[name].isel(batch=sample).values))
        if real.size:
            return int(real[0]), int(real[-1]) + 1
    return 0, real_length(labels)


def generated_from(ds: Any, dim: str, sample: int) -> int | None:
    """The first position along ``dim`` that generation produced (its ``<axis>_step`` is
    above 0) in one sample of a traced ``generate()``; None for a trace of forward passes."""
    axis = token_axis_of(dim)
    name = f"{axis}_step" if axis else None
    if name is None or name not in ds.variables or \
            int(ds[name].sizes[str(ds[name].dims[-1])]) != int(ds.sizes.get(dim, -1)):
        return None
    made = np.flatnonzero(np.asarray(ds[name].isel(batch=sample).values) > 0)
    return int(made[0]) if made.size else None


def real_rows(ds: Any, dim: str, batch: slice) -> np.ndarray | None:
    """(samples, positions) True at the real tokens along ``dim`` of a slice of samples,
    None where the trace has no mask for it."""
    name = mask_name(ds, dim)
    return None if name is None else np.asarray(ds[name].isel(batch=batch).values, dtype=bool)


def sample_texts(ds: Any, dim: str, batch: slice) -> np.ndarray | None:
    """The token strings along ``dim`` of a slice of samples, or None without texts."""
    name = text_of(dim)
    if name is None or name not in ds.variables:
        return None
    return as_str(ds[name].isel(batch=batch).values)


# -- stack, layer, self or cross --------------------------------------------------------------


def stack_attr(da: Any) -> str | None:
    stack = da.attrs.get("stack")
    return str(stack) if stack else None


def layer_attr(da: Any) -> int | None:
    layer = da.attrs.get("layer")
    return int(layer) if layer is not None else None


def attention_type(da: Any) -> str | None:
    """``self`` or ``cross`` for an attention map: its ``attention`` attribute, else told by
    its axes (queries and keys labeled by different token axes attend across stacks)."""
    kind = da.attrs.get("attention")
    if kind in ATTENTION_TYPES:
        return str(kind)
    query, key = dim_of(da, "query"), dim_of(da, "key")
    if query is None or key is None:
        return None
    if token_axis_of(query) != token_axis_of(key):
        return "cross"
    return "self" if stack_attr(da) else None


def describe(da: Any, fallback_layer: int | None = None) -> str:
    """A short name of where a variable sits: ``encoder 0``, ``decoder 1 cross``,
    ``decoder 1 self``, ``layer 3`` (models without stacks), ``?`` when nothing is known."""
    layer = layer_attr(da)
    if layer is None:
        layer = fallback_layer
    stack = stack_attr(da)
    if stack is None:
        return f"layer {layer}" if layer is not None else "?"
    parts = [stack, str(layer) if layer is not None else "?"]
    kind = attention_type(da)
    if kind is not None and stack != "encoder":  # an encoder attends to itself only
        parts.append(kind)
    return " ".join(parts)


def stacks_in(ds: Any, names: Sequence[str]) -> list[str]:
    found = {s for n in names if (s := stack_attr(ds[n])) is not None}
    return [s for s in STACKS if s in found] + sorted(found - set(STACKS))


def choose(ds: Any, names: Sequence[str], what: str, layer: int | None = None,
           stack: str | None = None, attention: str | None = None) -> list[str]:
    """The variables among ``names`` of ``stack``, ``attention`` type and ``layer``.

    A layer number is ambiguous in an encoder-decoder trace (each stack counts from 0) and
    a decoder layer holds both self- and cross-attention: rather than pick one silently,
    this refuses, naming the option that decides.
    """
    chosen = list(names)
    if stack is not None:
        present = stacks_in(ds, chosen)
        if stack not in present:
            has = f"its stacks are {', '.join(present)}" if present else "it has no stacks"
            raise RenderError(f"no {what} in stack {stack!r}: {has}")
        chosen = [n for n in chosen if stack_attr(ds[n]) == stack]
    if attention is not None:
        if attention not in ATTENTION_TYPES:
            raise RenderError(f"attention must be 'self' or 'cross', not {attention!r}")
        typed = [n for n in chosen if attention_type(ds[n]) == attention]
        if not typed:
            where = f" in stack {stack!r}" if stack else ""
            raise RenderError(f"no {attention}-attention{where} in this trace")
        chosen = typed
    if layer is not None:
        at_layer = [n for n in chosen if layer_attr(ds[n]) == layer]
        if not at_layer:
            layers = sorted({v for n in chosen if (v := layer_attr(ds[n])) is not None})
            where = f" of stack {stack!r}" if stack else ""
            raise RenderError(f"no {what} at layer {layer}{where}; this trace has layers {layers}")
        chosen = at_layer
        stacks = stacks_in(ds, chosen)
        if len(stacks) > 1:
            raise RenderError(
                f"layer {layer} is in {len(stacks)} stacks ({', '.join(stacks)}); "
                f"pass --stack {' or --stack '.join(stacks)}"
            )
        kinds = sorted({k for n in chosen if (k := attention_type(ds[n])) is not None})
        if len(kinds) > 1:
            raise RenderError(
                f"{stacks[0] if stacks else 'layer'} {layer} has both self- and "
                "cross-attention; pass --attention self or --attention cross"
            )
    return chosen


# -- color ranges ----------------------------------------------------------------------------


def color_range(values: np.ndarray, low: float | None = None,
                high: float | None = None) -> tuple[float, float]:
    """(vmin, vmax) with vmin < vmax for any map: a constant or 1x1 map (or one of a single
    finite value) gets a range around its value, so its color is not an accident of a
    zero-width norm."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    lo = float(low) if low is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(high) if high is not None else (float(finite.max()) if finite.size else 1.0)
    if hi > lo:
        return lo, hi
    pad = max(abs(lo) * 0.5, 0.5)
    if low is not None:
        return lo, lo + 2 * pad
    if high is not None:
        return hi - 2 * pad, hi
    return lo - pad, hi + pad


def is_degenerate(values: np.ndarray) -> bool:
    """One cell, or every finite cell the same: the colors alone say nothing."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return finite.size <= 1 or bool(finite.min() == finite.max())


def write_value(ax: Any, values: np.ndarray, extent: Sequence[float] | None = None) -> None:
    """On a degenerate map, write its value in the middle of the panel."""
    if not is_degenerate(values):
        return
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    text = f"{float(finite[0]):.3g}" if finite.size else "no finite value"
    if extent is None:
        rows, cols = np.shape(values)[:2]
        extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    x = (extent[0] + extent[1]) / 2
    y = (extent[2] + extent[3]) / 2
    ax.text(x, y, escape(text), ha="center", va="center", fontsize=9, color="white",
            bbox={"facecolor": "black", "alpha": 0.5, "linewidth": 0, "pad": 1.5})
