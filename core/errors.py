"""Errors raised by layerscope. Each says what was wrong and what to do."""

from __future__ import annotations


class LayerscopeError(Exception):
    """Base class of every error layerscope raises on purpose."""


class StoreError(LayerscopeError):
    """A trace store cannot be created, opened or appended to."""


class SchemaError(StoreError):
    """A store was written by an incompatible layerscope, or an append does not match it."""


class BackendError(LayerscopeError):
    """No backend can handle a model, or a backend cannot capture what was asked."""


class CaptureError(LayerscopeError):
    """A captured tensor cannot be stored (shape, dtype or naming conflict)."""


class WriterError(LayerscopeError):
    """Writing a batch failed in a worker thread; the original exception is chained."""


class StoreLockedError(StoreError):
    """Another live writer holds the store's lock; the message names the holder."""


class DamagedStoreError(StoreError):
    """A store's metadata or data is damaged (unreadable, inconsistent or missing)."""


class ChunkError(DamagedStoreError):
    """A chunk is damaged, missing or not the one that was written; names variable and key."""

    def __init__(self, message: str, variable: str, key: str) -> None:
        super().__init__(message)
        self.variable = variable
        self.key = key

    def __reduce__(self) -> tuple[type[ChunkError], tuple[str, str, str]]:
        # raised in a worker process (dask distributed), it is pickled back to the caller
        return type(self), (str(self), self.variable, self.key)
