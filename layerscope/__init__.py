"""layerscope: see inside a neural network while it runs.

Capture attention weights, hidden states and activations from PyTorch, TensorFlow/Keras and
JAX models into one labeled, chunked, compressed Zarr format, and draw them lazily.
Importing layerscope imports no framework; a backend loads its framework when it is used.
"""

__version__ = "0.1.0"

from layerscope._estimate import Estimate, estimate  # noqa: E402
from layerscope.api import Trace, capture, sites, trace  # noqa: E402
from layerscope.core import (  # noqa: E402
    BackendError,
    CaptureError,
    ChunkError,
    Compression,
    DamagedStoreError,
    LayerscopeError,
    SchemaError,
    Selection,
    StoreError,
    StoreLockedError,
    StoreOptions,
    WriterError,
    captured_names,
    open_trace,
)
from layerscope.core.diff import diff  # noqa: E402
from layerscope.core.samples import masked, sample  # noqa: E402
from layerscope.core.verify import VerifyReport, verify  # noqa: E402

__all__ = [
    "BackendError", "CaptureError", "ChunkError", "Compression", "DamagedStoreError", "Estimate",
    "LayerscopeError", "SchemaError", "Selection", "StoreError", "StoreLockedError", "StoreOptions",
    "Trace", "VerifyReport", "WriterError", "__version__", "captured_names", "capture", "diff",
    "estimate", "masked", "open_trace", "sample", "sites", "trace", "verify",
]
