"""Errors raised by layerscope. Each says what was wrong and what to do."""


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
