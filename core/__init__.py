"""layerscope.core: the trace format, naming, selection, streaming writer and reader.

Core never imports a framework; backends hand it tensors and a ``to_numpy`` function.
"""

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
from .format import SCHEMA_VERSION, Compression, StoreOptions
from .reader import captured_names, open_trace, read_attrs
from .recorder import Recorder
from .selection import Selection, SiteInfo

__all__ = [
    "BackendError", "CaptureError", "ChunkError", "Compression", "DamagedStoreError",
    "LayerscopeError", "Recorder", "SCHEMA_VERSION", "SchemaError", "Selection", "SiteInfo",
    "StoreError", "StoreLockedError", "StoreOptions", "WriterError", "captured_names", "open_trace",
    "read_attrs",
]
