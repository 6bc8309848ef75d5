"""Each sample over its own tokens: the views of a trace that the token masks make possible.

Token axes hold the longest pass's length; a sample's real tokens are where its mask
(``token_mask``, ``decoder_token_mask``) is True. Both helpers stay lazy: :func:`sample` reads
one row of the mask, :func:`masked` reads nothing until values are asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .format import BATCH, DECODER_TOKEN_MASK, TOKEN_MASK
from .naming import token_axis_of

_MASKS = {"token": TOKEN_MASK, "decoder_token": DECODER_TOKEN_MASK}


def mask_name(ds: Any, dim: str) -> str | None:
    """The mask coordinate that says which positions of ``dim`` are real tokens (``query`` and
    ``key`` share ``token``'s), None where the trace has none or it is of another length (a
    ``token_<size>`` axis)."""
    name = _MASKS.get(token_axis_of(dim) or "")
    if name is None or name not in ds.variables:
        return None
    mask = ds[name]
    axis = str(mask.dims[-1])
    return name if int(mask.sizes[axis]) == int(ds.sizes.get(dim, -1)) else None


def sample(ds: Any, index: int) -> Any:
    """Sample ``index`` of the trace ``ds`` (from :func:`layerscope.open_trace`), every token
    axis cut to the sample's own tokens (padding and positions past its pass's length left
    out), still lazy; the token coordinates keep the positions as stored."""
    one = ds.isel({BATCH: index})
    cuts: dict[str, np.ndarray] = {}
    real: dict[str, np.ndarray] = {}
    for dim in ds.dims:
        name = mask_name(ds, str(dim))
        if name is None:
            continue
        if name not in real:
            real[name] = np.flatnonzero(np.asarray(ds[name].isel({BATCH: index}).values))
        cuts[str(dim)] = real[name]
    return one.isel(cuts) if cuts else one


def real_tokens(da: Any, ds: Any = None) -> Any:
    """A lazy bool DataArray, True where every token axis of ``da`` is a real token of the
    sample (from the masks of ``ds``, else of ``da``'s own coordinates); None where no mask
    applies (a trace without masks, a variable without token axes)."""
    import xarray as xr

    if BATCH not in da.dims:
        return None
    source = ds if ds is not None else da.coords
    keep = None
    for dim in da.dims:
        name = _MASKS.get(token_axis_of(str(dim)) or "")
        if name is None or name not in source:
            continue
        mask = source[name]
        if int(mask.sizes[mask.dims[-1]]) != int(da.sizes[dim]) \
                or int(mask.sizes[BATCH]) != int(da.sizes[BATCH]):
            continue
        real = xr.DataArray(mask.data, dims=(BATCH, str(dim)))
        keep = real if keep is None else keep & real
    return keep


def masked(ds: Any) -> Any:
    """``ds`` with NaN in every floating-point variable wherever one of its token axes is
    not a real token of the sample, lazily (nothing is read until values are asked for)."""
    out = ds.copy()
    for name, da in ds.data_vars.items():
        keep = real_tokens(da, ds) if da.dtype.kind == "f" else None
        if keep is not None:
            out[name] = da.where(keep)
    return out
