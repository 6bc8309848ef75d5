"""Reading: lazy open, plain xarray compatibility, schema checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from zarr.storage import LocalStore, WrapperStore

import layerscope
from layerscope.core import SchemaError, StoreError

from .test_writer import make_recorder, write_batches


class CountingStore(WrapperStore):
    """Records every key read, so a test can say what was touched."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.keys.extend(key for key, _ in key_ranges)
        return await super().get_partial_values(prototype, key_ranges)

    def data_keys(self) -> list[str]:
        """Keys of chunks, leaving out metadata documents (v3 and the v2 ones probed) and the
        chunk manifest (``_layerscope/``), read once before the first chunk is checked."""
        meta = ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")
        return [k for k in self.keys if not k.endswith(meta) and not k.startswith("_layerscope/")]


@pytest.fixture()
def trace_path(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    write_batches(recorder, 3)
    recorder.close()
    return path


def test_open_trace_reads_no_array_data(trace_path):
    store = CountingStore(LocalStore(str(trace_path), read_only=True))
    ds = layerscope.open_trace(store)
    assert store.data_keys() == []
    assert ds["block.0@output"].chunks is not None  # dask-backed
    one = ds["block.0@output"].isel(batch=5).values
    assert one.shape == (5, 8)
    assert {k.split("/")[0] for k in store.data_keys()} == {"block.0@output"}


def test_plain_xarray_open_zarr_works(trace_path):
    ds = xr.open_zarr(trace_path)
    traced = layerscope.open_trace(trace_path)
    np.testing.assert_array_equal(ds["block.0@output"].values, traced["block.0@output"].values)
    assert ds.attrs["schema_version"] == 1


def test_newer_schema_is_refused(trace_path):
    meta = json.loads((trace_path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (trace_path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="upgrade layerscope"):
        layerscope.open_trace(trace_path)


def test_not_a_trace(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        layerscope.open_trace(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError):
        layerscope.open_trace(tmp_path / "empty")


def test_variables_are_in_execution_order(trace_path):
    ds = layerscope.open_trace(trace_path)
    assert layerscope.captured_names(ds) == ["block.0@output", "block.0@output.call1"]


def test_dask_arrays_are_xarrays_own_in_chunks_values_and_names(trace_path, tmp_path):
    """open_trace makes its dask graphs itself (core/lazy.py): every variable as
    ``xarray.open_zarr(chunks={})`` has it, in chunks and values; the same store opened twice
    gives the same dask names (dask's caches may share results), a store with more batches
    other names."""
    traced = layerscope.open_trace(trace_path)
    plain = xr.open_zarr(trace_path, chunks={}, create_default_indexes=False)
    compared = [name for name in plain.variables if plain[name].ndim > 0]
    assert set(compared) <= set(traced.variables) and len(compared) > 3
    for name in compared:
        assert traced[name].chunks == plain[name].chunks, name
        np.testing.assert_array_equal(traced[name].values, plain[name].values)
    again = layerscope.open_trace(trace_path)
    assert again["block.0@output"].data.name == traced["block.0@output"].data.name
    grown = tmp_path / "grown.zarr"
    recorder = make_recorder(grown)
    write_batches(recorder, 4)
    recorder.close()
    assert layerscope.open_trace(grown)["block.0@output"].data.name != \
        traced["block.0@output"].data.name
    first = traced["block.0@output"]
    np.testing.assert_array_equal(first[2:4, 1].values, plain["block.0@output"][2:4, 1].values)


def test_the_collector_is_as_before_once_a_trace_is_open(trace_path):
    """open_trace leaves the program's objects out of collections while it makes the
    dataset's (core/collector.py), and not after."""
    import gc

    gc.unfreeze()
    layerscope.open_trace(trace_path)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.freeze()  # the program's own: kept (less what reference counting frees meanwhile)
    frozen = gc.get_freeze_count()
    layerscope.open_trace(trace_path)
    assert 0 < gc.get_freeze_count() <= frozen
    gc.unfreeze()
