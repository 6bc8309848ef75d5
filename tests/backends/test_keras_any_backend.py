"""Keras 3 specifics that hold on every backend Keras runs on: ``model.predict``, bfloat16,
and ``to_numpy`` of the backend's own tensors. Runs here on TensorFlow, and on JAX and
PyTorch from tests/backends/test_keras_backends.py."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

import layerscope
from layerscope.backends import get_backend


def _cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="fc"),
    ], name="cnn")


def test_predict_is_captured_on_this_backend(tmp_path: Path) -> None:
    model = _cnn()
    x = np.random.default_rng(0).standard_normal((6, 8, 8, 1)).astype(np.float32)
    model.predict(x[:2], verbose=0)  # step functions made before the block
    path = tmp_path / "predict.zarr"
    with layerscope.trace(model, path):
        predicted = model.predict(x, batch_size=3, verbose=0)
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 2 and ds.sizes["batch"] == 6
    assert ds.attrs["framework"] == f"keras/{keras.backend.backend()}"
    np.testing.assert_array_equal(ds["fc@output"].values, predicted)
    assert ds["conv@output"].dims == ("batch", "height", "width", "channel")
    np.testing.assert_array_equal(model.predict(x, batch_size=3, verbose=0), predicted)


def test_bfloat16_and_backend_tensors_to_numpy(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, dtype="mixed_bfloat16", name="half")])
    x = np.random.default_rng(7).standard_normal((2, 4)).astype(np.float32)
    returned = model(x)
    assert keras.backend.standardize_dtype(returned.dtype) == "bfloat16"
    widened = keras.ops.convert_to_numpy(keras.ops.cast(returned, "float32"))
    backend = get_backend("keras")
    converted = backend.to_numpy(returned)  # the backend's own tensor, as a caller holds it
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, widened)
    ints = keras.ops.convert_to_tensor(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert backend.to_numpy(ints).dtype == np.int32
    ds = layerscope.capture(model, x, tmp_path / "bf16.zarr", capture=["half"])
    assert ds["half@output"].dtype == np.float32
    np.testing.assert_array_equal(ds["half@output"].values, widened)
