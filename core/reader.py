"""Reading traces: a lazy, dask-backed xarray Dataset that trusts only committed batches."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import StoreError
from .format import (
    BATCH,
    INPUT_TEXT,
    STATUS_ABORTED,
    STATUS_COMPLETE,
    TOKEN_ID,
    TOKEN_TEXT,
)
from .naming import is_capture
from .store import check_schema
from .userwarn import warn_user

LABELS = (BATCH, TOKEN_ID, TOKEN_TEXT, INPUT_TEXT)


@contextmanager
def _format_notices_hidden() -> Iterator[None]:
    """Hide what zarr and xarray say about the format while a trace is opened (consolidated
    metadata outside the v3 spec, string arrays without a stable v3 spec in some zarr 3.1
    releases): a reader can do nothing about either. Deprecation and future warnings about
    the calls made here still pass, to be fixed here, not hidden."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=r"The data type .* does not have a Zarr V3 "
                                "specification", category=FutureWarning)
        yield


def read_attrs(store: Any) -> dict[str, Any]:
    """The group attributes of a trace, checked to be a layerscope store of a known schema."""
    import zarr

    where = str(store)
    if isinstance(store, (str, os.PathLike)) and "://" not in where and not os.path.exists(where):
        raise StoreError(f"no trace at {where}: the path does not exist")
    try:
        with _format_notices_hidden():
            group = zarr.open_group(store, mode="r")
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise StoreError(f"{where} is not a Zarr v3 group ({exc}); is it a layerscope trace?") \
            from exc
    attrs = dict(group.attrs)
    check_schema(attrs, where)
    return attrs


def open_trace(store: Any, *, complete_only: bool = False) -> Any:
    """Open a trace lazily: no array data is read until a value is asked for.

    Rows past ``committed_samples`` (a writer still running, or one that crashed) are cut
    off. ``complete_only=True`` refuses a store whose writer did not finish.
    """
    import xarray as xr

    attrs = read_attrs(store)
    status = attrs.get("status")
    if status != STATUS_COMPLETE:
        message = (
            f"{store} has status {status!r}: "
            + ("the capture was interrupted" if status == STATUS_ABORTED
               else "its writer is still running or crashed")
            + f"; showing the {attrs.get('committed_batches', 0)} committed batches"
        )
        if complete_only:
            raise StoreError(message)
        warn_user(message)
    with _format_notices_hidden():
        ds = xr.open_zarr(store, chunks={}, create_default_indexes=False, decode_times=False)
    if BATCH in ds.dims:
        ds = ds.isel({BATCH: slice(0, int(attrs.get("committed_samples", 0)))})
    ordered = sorted(ds.data_vars, key=lambda name: ds[name].attrs.get("order", 1 << 30))
    ds = ds[ordered]
    labels = [name for name in LABELS if name in ds.variables]
    ds = ds.set_coords(labels)
    for dim in ds.dims:
        if str(dim).startswith("token") and dim not in ds.coords:
            ds = ds.assign_coords({dim: np.arange(ds.sizes[dim])})
    ds.attrs = attrs
    return ds


def captured_names(ds: Any) -> list[str]:
    """Names of the captured variables, in execution order (the order they were first put)."""
    return [str(name) for name in ds.data_vars if is_capture(str(name))]
