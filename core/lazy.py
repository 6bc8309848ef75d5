"""Dask arrays over a trace's variables, made directly: the graphs ``dask.array.from_array``
makes, without its cost per array.

``xarray.open_zarr(chunks={})`` gives each variable a dask array through
``dask.array.from_array``, about 0.2 ms an array (the getter's signature inspected twice, a
blockwise layer, the chunks normalized four times): 0.44 s of a 0.82 s open of a store of 2,000
variables. Here the store is opened without dask and each variable of one dimension or more
gets a graph of two small layers, the lazily indexed array and one ``getter`` task a block:
the tasks that layer would hold, under a name made from the store's state and the variable's
name, so the same store opened twice shares names and a store that changed does not.
"""

from __future__ import annotations

from itertools import accumulate, product
from typing import Any

from .gather import GATHERED
from .schema import BATCH


def blocks(size: int, step: int) -> tuple[int, ...]:
    """The lengths of the blocks of ``step`` that cover ``size`` (one empty block for 0)."""
    if size == 0:
        return (0,)
    return (step,) * (size // step) + ((size % step,) if size % step else ())


def with_dask(ds: Any, token: str) -> Any:
    """``ds`` (opened with ``chunks=None, cache=False``) with every variable of one dimension
    or more on dask, in the store's chunks, except gathered variables (chunks of several
    batches, :mod:`.gather`) beside others along ``batch``: those get blocks of one batch, as
    the others have, since a DataArray and its coordinates must agree on their chunks."""
    along = {name: var for name, var in ds.variables.items() if var.dims[:1] == (BATCH,)}
    gathered = {name: n for name, var in along.items()
                if isinstance(n := var.attrs.get(GATHERED), int) and n > 1}
    mixed = bool(gathered) and len(gathered) < len(along)
    data = {name: dask_array(var, f"open_trace-{name}-{token}",
                             gathered.get(name, 1) if mixed else 1)
            for name, var in ds.variables.items() if var.ndim > 0}
    coords = list(ds.coords)  # none but where a writer named some: no index is made
    plain = ds.reset_coords(coords) if coords else ds
    ds = plain.copy(data={name: data.get(name) for name in plain.data_vars})
    return ds.set_coords(coords) if coords else ds


def dask_array(var: Any, key: str, parts: int = 1) -> Any:
    """Variable ``var``'s lazily indexed data as a dask array named ``key``, one block a
    chunk of the store, each chunk cut into ``parts`` blocks along the first axis (a gathered
    chunk of several batches: a block a batch)."""
    import numpy as np
    from dask._task_spec import DataNode, Task, TaskRef
    from dask.array import Array
    from dask.array.core import getter
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
    from xarray.core.indexing import ImplicitToExplicitIndexingAdapter, OuterIndexer

    preferred = var.encoding.get("preferred_chunks") or {}
    steps = [max(1, int(preferred.get(dim, size) or 1)) for dim, size in var.sizes.items()]
    steps[0] = max(1, steps[0] // parts)
    chunks = tuple(blocks(size, step) for size, step in zip(var.shape, steps, strict=True))
    source = f"original-{key}"
    edges = [list(accumulate(lengths, initial=0)) for lengths in chunks]
    tasks: dict[Any, Any] = {}
    for block in product(*(range(len(lengths)) for lengths in chunks)):
        where = tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, block, strict=True))
        tasks[(key, *block)] = Task((key, *block), getter, TaskRef(source),
                                    DataNode(None, where))
    graph = HighLevelGraph(
        {source: MaterializedLayer({source: ImplicitToExplicitIndexingAdapter(
            var._data, OuterIndexer)}), key: MaterializedLayer(tasks)},
        {source: set(), key: {source}})
    return Array(graph, key, chunks, meta=np.empty((0,) * var.ndim, var.dtype))
