"""Tensors of the backend Keras 3 runs on: TensorFlow, JAX or PyTorch.

Keras picks its backend once per process (``KERAS_BACKEND`` before ``import keras``); the
functions here ask it which one and import only that framework. A *value* is a concrete
tensor with storable numbers: not a ``KerasTensor``, not a JAX tracer, not a PyTorch tensor on
the ``meta`` device (what Keras traces ``call`` with to infer shapes), not a TensorFlow string,
variant or resource tensor. NumPy arrays are values too (functional models pass them on).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import keras
import numpy as np

from layerscope.core.writerecords import Alloc


def keras_backend() -> str:
    """The backend this process's Keras runs on."""
    return str(keras.backend.backend())


def framework_name() -> str:
    """``keras/<backend>``: what a Keras model's trace records as its ``framework``."""
    return f"keras/{keras_backend()}"


@functools.cache
def _framework() -> Any:
    """The framework module Keras runs on (imported once, on first use)."""
    import importlib

    return importlib.import_module(keras_backend())


def framework_version() -> str:
    backend = keras_backend()
    return f"keras {keras.__version__} on {backend} {_framework().__version__}"


def _is_storable_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf" or dtype.name == "bfloat16"


def is_value(value: Any) -> bool:
    """A concrete tensor (or NumPy array) of numbers on this process's Keras backend."""
    if isinstance(value, np.ndarray):
        return _is_storable_dtype(value.dtype)
    if isinstance(value, keras.KerasTensor):
        return False
    backend = keras_backend()
    if backend == "tensorflow":
        tf = _framework()
        return isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype not in (
            tf.string, tf.variant, tf.resource)
    if backend == "jax":
        import jax

        return isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    if backend == "torch":
        torch = _framework()
        return (isinstance(value, torch.Tensor) and value.device.type != "meta"
                and not value.dtype.is_complex)
    return False


def is_tracer(value: Any) -> bool:
    """A JAX tracer: a value that exists only while a ``jax.jit`` function is traced."""
    if keras_backend() != "jax":
        return False
    import jax

    return isinstance(value, jax.core.Tracer)


def rank(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return len(shape)
    except (TypeError, ValueError):  # a TensorFlow shape of unknown rank
        return None


def static_size(size: Any) -> int | None:
    """An axis length as an int; None while a graph is traced and it is not known yet."""
    try:
        return int(size)
    except (TypeError, ValueError):
        return None


def is_integer(value: Any) -> bool:
    dtype = keras.backend.standardize_dtype(value.dtype)
    return dtype.startswith(("int", "uint"))


def eager() -> bool:
    """True when tensors hold values now; False while TensorFlow traces a graph."""
    if keras_backend() != "tensorflow":
        return True
    return bool(_framework().executing_eagerly())


def no_grad() -> contextlib.AbstractContextManager[Any]:
    """Inference without building an autograd graph (PyTorch); nothing elsewhere."""
    if keras_backend() == "torch":
        return _framework().no_grad()  # type: ignore[no-any-return]
    return contextlib.nullcontext()


def convert_input(value: Any) -> Any:
    """A NumPy array turned into a tensor of the Keras backend, dtype kept."""
    if isinstance(value, np.ndarray):
        return keras.ops.convert_to_tensor(value)
    return value


class Held:
    """A tensor queued for the writer, with the byte size its memory budget counts."""

    __slots__ = ("nbytes", "shape", "tensor")

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor
        self.shape = tuple(int(n) for n in tensor.shape)
        itemsize = np.dtype(keras.backend.standardize_dtype(tensor.dtype)
                            .replace("bfloat16", "float32")).itemsize
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * itemsize


def _torch_host_dtype(tensor: Any) -> np.dtype:
    torch = _framework()
    if tensor.dtype == torch.bfloat16:
        return np.dtype(np.float32)  # exact: every bfloat16 is a float32
    return np.dtype(keras.backend.standardize_dtype(tensor.dtype))


def snapshot_torch(tensor: Any, alloc: Alloc) -> np.ndarray:
    """A PyTorch tensor copied to host memory now: Keras ops on PyTorch may reuse storage."""
    torch = _framework()
    host = alloc(tuple(int(n) for n in tensor.shape), _torch_host_dtype(tensor))
    torch.from_numpy(host).copy_(tensor.detach())
    return host


def to_numpy(value: Any) -> np.ndarray:
    """A host copy of a tensor of any Keras backend, dtype kept (bfloat16 widened to float32,
    exactly). Thread-safe: it needs nothing from the model's thread."""
    if isinstance(value, Held):
        value = value.tensor
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "detach"):  # a PyTorch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        array = value.numpy()
    elif hasattr(value, "numpy"):  # a TensorFlow eager tensor
        array = np.asarray(value.numpy())
    else:  # a JAX array, or anything NumPy can read
        array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array
