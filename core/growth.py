"""Token axes that grow: passes of different token lengths append to one store.

A dim whose :func:`.naming.token_axis_of` is not None (``token``, ``query``, ``key``, the
decoder's, and their ``_<size>`` variants) may take a new length in every pass, and so may an
axis no backend named (``axis<i>``: it may follow the tokens too). The stored
length is the longest seen: a longer pass grows every array that has the dim, together (so the
Dataset stays valid), and a shorter one is filled past its own length, never cut. Every other
dim keeps the one size it was created with.

Growing changes only the array's shape in its metadata: chunks along a token axis keep the
shape they were created with and growth adds chunk columns. Rows already committed read as
fill values there (no chunk file: the fill value; an edge chunk: zarr wrote fill values past
the old length). The grown shape reaches readers with the next commit's root document.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._zarr_compat import set_shape
from .commit import array_document
from .errors import CaptureError
from .naming import growable_axis, token_axis_of

#: the smallest chunk along a token axis: a first pass of a few tokens still leaves room for
#: longer ones without a chunk per handful of positions
MIN_TOKEN_CHUNK = 16


@functools.lru_cache(maxsize=1024)
def grows(dim: str) -> bool:
    """Whether ``dim``'s length may differ from pass to pass."""
    return growable_axis(dim)


def is_token_axis(dim: str) -> bool:
    return token_axis_of(dim) is not None


def fill_value_for(dtype: np.dtype) -> Any:
    """What a position past a sample's own length holds: NaN for floats, -1 for signed
    integers (token ids), 0 for unsigned ones, False for booleans (the token mask), "" for
    text."""
    kind = np.dtype(dtype).kind
    if kind in "fc":
        return float("nan")
    if kind in "UTO":
        return ""
    if kind == "b":
        return False
    return -1 if kind == "i" else 0


def token_chunk(size: int) -> int:
    """The chunk length along a token axis first seen with ``size`` positions: the next power
    of two, at least :data:`MIN_TOKEN_CHUNK`, so that growth adds few chunks."""
    return max(MIN_TOKEN_CHUNK, 1 << max(0, int(size) - 1).bit_length())


def padded(data: np.ndarray, shape: tuple[int, ...], fill: Any) -> np.ndarray:
    """``data`` (batch first) filled with ``fill`` up to ``shape`` per sample."""
    if tuple(data.shape[1:]) == tuple(shape):
        return data
    out = np.full((data.shape[0], *shape), fill, dtype=data.dtype)
    out[tuple(slice(0, n) for n in data.shape)] = data
    return out


def check_lengths(name: str, dims: tuple[str, ...], stored: tuple[int, ...],
                  shape: tuple[int, ...], lengths: dict[str, int]) -> dict[str, int]:
    """The token dims of an existing variable ``name`` that must grow to take a tensor of
    ``shape`` (batch first) ``{dim: new length}``.

    ``lengths``: each token dim's length in the current pass, filled in here; a variable
    whose token axis disagrees with it, or whose other axes differ from the ``stored`` ones,
    raises :class:`CaptureError`.
    """
    growth: dict[str, int] = {}
    for dim, size, old in zip(dims[1:], shape[1:], stored, strict=True):
        if grows(dim):
            length = lengths.setdefault(dim, size)
            if length != size:
                raise CaptureError(
                    f"{name}: its {dim} axis has {size} positions where other tensors of this "
                    f"pass have {length}"
                )
            if size > old:
                growth[dim] = size
        elif size != old:
            raise CaptureError(
                f"{name}: its {dim} axis has {size} positions where the store holds {old}; "
                "only token axes (and axes no backend named) may change length between "
                "passes: write to a new store"
            )
    return growth


def committed_shape(shape: list[int], dims: list[str], lengths: dict[str, int]) -> list[int]:
    """``shape`` with each token axis cut to its committed length in ``lengths``: a pass that
    grew it and never committed leaves no trace in what readers see."""
    return [min(n, lengths.get(d, n)) if grows(d) else n for n, d in zip(shape, dims, strict=True)]


def grow_axis(variables: Iterable[Any], dim: str, size: int) -> None:
    """Give every variable with ``dim`` ``size`` positions along it: its ``trailing`` shape,
    its array's shape in memory and its consolidated-metadata document (published with the
    next commit). The caller holds the locks that keep writers and publishers out."""
    for var in variables:
        if dim not in var.dims[1:]:
            continue
        axis = var.dims.index(dim) - 1
        if var.trailing[axis] == size:
            continue
        var.trailing = (*var.trailing[:axis], size, *var.trailing[axis + 1:])
        if var.array is None:
            continue  # created later at the grown size
        with var.lock:
            set_shape(var.array, (int(var.array.shape[0]), *var.trailing))
            var.document = array_document(var.array)


def cut_document(document: dict[str, Any], lengths: dict[str, int]) -> dict[str, Any]:
    """An array's document with its token axes at their committed lengths."""
    dims = list(document.get("dimension_names") or [])
    shape = list(document["shape"])
    if len(dims) != len(shape):
        return document
    cut = committed_shape(shape, dims, lengths)
    return document if cut == shape else {**document, "shape": cut}
