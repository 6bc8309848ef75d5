"""Reductions written out sample by sample in NumPy, from a tensor the framework returned and
its mask: what the stored reductions are checked against (independent of layerscope's code)."""

from __future__ import annotations

import numpy as np


def real(mask_row: np.ndarray) -> np.ndarray:
    """The positions of a sample's real tokens."""
    return np.flatnonzero(np.asarray(mask_row) != 0)


def positions(x: np.ndarray, mask: np.ndarray, start: int, stop: int | None,
              axis: int = 1) -> np.ndarray:
    """Positions start..stop of each sample's real tokens (negative: from its last), NaN
    where a sample has none: (batch, n, ...) with the positions on ``axis``."""
    length = (stop if stop is not None else 0) - start
    rows = []
    for b in range(x.shape[0]):
        own = real(mask[b])
        sample = np.moveaxis(x[b].astype(np.float64), axis - 1, 0)
        picked = []
        for j in range(length):
            where = start + j if start >= 0 else len(own) + start + j
            if 0 <= where < len(own):
                picked.append(sample[own[where]])
            else:
                picked.append(np.full(sample.shape[1:], np.nan))
        rows.append(np.moveaxis(np.stack(picked), 0, axis - 1))
    return np.stack(rows)


def last(x: np.ndarray, mask: np.ndarray, axis: int = 1) -> np.ndarray:
    return positions(x, mask, -1, None, axis).take(0, axis=axis)


def first(x: np.ndarray, mask: np.ndarray, axis: int = 1) -> np.ndarray:
    return positions(x, mask, 0, 1, axis).take(0, axis=axis)


def mean(x: np.ndarray, mask: np.ndarray, axis: int = 1) -> np.ndarray:
    """The mean over the real tokens of each sample, in float64."""
    return np.stack([np.take(x[b].astype(np.float64), real(mask[b]), axis=axis - 1)
                     .mean(axis=axis - 1) for b in range(x.shape[0])])


def masked(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x`` (batch, token, ...) with NaN at the padding positions."""
    out = x.astype(np.float64).copy()
    out[np.asarray(mask) == 0] = np.nan
    return out


def norm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sqrt((x.astype(np.float64) ** 2).sum(axis=axis))


def topk(x: np.ndarray, k: int, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    index = np.argsort(-x, axis=axis, kind="stable").take(np.arange(k), axis=axis)
    return np.take_along_axis(x, index, axis=axis), index
