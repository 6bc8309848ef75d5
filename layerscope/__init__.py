"""layerscope: see inside a neural network while it runs.

Capture attention weights, hidden states and activations from PyTorch, TensorFlow/Keras and
JAX models into one labeled, chunked, compressed Zarr format, and draw them lazily.
Importing layerscope imports no framework; a backend loads its framework when it is used.
The public names are imported on first use (PEP 562), so that the ``layerscope`` command
imports only what the command it runs needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from layerscope._estimate import Estimate, estimate
    from layerscope.api import Trace, capture, sites, trace
    from layerscope.core import (
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
    from layerscope.core.diff import diff
    from layerscope.core.samples import masked, sample
    from layerscope.core.verify import VerifyReport, verify

#: module -> the public names it defines, imported when one of them is first asked for
_SOURCES = {
    "layerscope._estimate": ("Estimate", "estimate"),
    "layerscope.api": ("Trace", "capture", "sites", "trace"),
    "layerscope.core": (
        "BackendError", "CaptureError", "ChunkError", "Compression", "DamagedStoreError",
        "LayerscopeError", "SchemaError", "Selection", "StoreError", "StoreLockedError",
        "StoreOptions", "WriterError", "captured_names", "open_trace",
    ),
    "layerscope.core.diff": ("diff",),
    "layerscope.core.samples": ("masked", "sample"),
    "layerscope.core.verify": ("VerifyReport", "verify"),
}
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "BackendError", "CaptureError", "ChunkError", "Compression", "DamagedStoreError", "Estimate",
    "LayerscopeError", "SchemaError", "Selection", "StoreError", "StoreLockedError", "StoreOptions",
    "Trace", "VerifyReport", "WriterError", "__version__", "captured_names", "capture", "diff",
    "estimate", "masked", "open_trace", "sample", "sites", "trace", "verify",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # asked once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
