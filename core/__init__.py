"""layerscope.core: the trace format, naming, selection, streaming writer and reader.

Core never imports a framework; backends hand it tensors and a ``to_numpy`` function.
"""

from .errors import (
    BackendError,
    CaptureError,
    LayerscopeError,
    SchemaError,
    StoreError,
    WriterError,
)
from .format import SCHEMA_VERSION, Compression, StoreOptions
from .reader import captured_names, open_trace, read_attrs
from .recorder import Recorder
from .selection import Selection, SiteInfo

__all__ = [
    "BackendError", "CaptureError", "Compression", "LayerscopeError", "Recorder", "SCHEMA_VERSION",
    "SchemaError", "Selection", "SiteInfo", "StoreError", "StoreOptions", "WriterError",
    "captured_names", "open_trace", "read_attrs",
]
