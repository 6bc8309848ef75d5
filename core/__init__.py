"""layerscope.core: the trace format, naming, selection, streaming writer and reader.

Core never imports a framework; backends hand it tensors and a ``to_numpy`` function. The
errors are imported here; every other name on first use (PEP 562), so that a module that
needs one part of core (``layerscope info`` reads only metadata) does not import zarr,
xarray and numpy for the writer and reader.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BackendError,
    CaptureError,
    ChunkError,
    DamagedStoreError,
    LayerscopeError,
    SchemaError,
    StoreError,
    StoreLockedError,
    WriterError,
)

if TYPE_CHECKING:
    from .format import SCHEMA_VERSION, Compression, StoreOptions
    from .reader import captured_names, open_trace, read_attrs
    from .recorder import Recorder
    from .selection import Selection, SiteInfo

#: name -> the module of core that defines it, imported when the name is first asked for
_LAZY = {
    "SCHEMA_VERSION": "format", "Compression": "format", "StoreOptions": "format",
    "captured_names": "reader", "open_trace": "reader", "read_attrs": "reader",
    "Recorder": "recorder", "Selection": "selection", "SiteInfo": "selection",
}

__all__ = [
    "BackendError", "CaptureError", "ChunkError", "Compression", "DamagedStoreError",
    "LayerscopeError", "Recorder", "SCHEMA_VERSION", "SchemaError", "Selection", "SiteInfo",
    "StoreError", "StoreLockedError", "StoreOptions", "WriterError", "captured_names", "open_trace",
    "read_attrs",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # asked once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
