"""A Keras CNN from ``keras.applications`` (MobileNetV3Small, random weights, 32x32 input):
every map is (batch, height, width, channel) as Keras stores it, lines up by name with its
channels-first view, and equals what the layer returns in the model's own functional graph."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import (
    KERAS_IMAGE,
    assert_lines_up,
    assert_same,
    attention_variables,
    captures,
)

CHANNELS_FIRST = ("batch", "channel", "height", "width")


@pytest.mark.parametrize("batch", [1, 3])
def test_mobilenet_maps(tmp_path: Path, batch: int) -> None:
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=10, alpha=0.75, minimalistic=True)
    images = (np.random.default_rng(batch).random((batch, 32, 32, 3)) * 255).astype("float32")
    ds = layerscope.capture(model, images, tmp_path / "mobilenet.zarr")
    assert ds.attrs["framework"] == f"keras/{keras.backend.backend()}"
    assert not attention_variables(ds)

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert set(captures(ds)) == {f"{layer.name}@output" for layer in layers} | {"root@output"}
    # the model's own graph, cut at every layer: what each layer returns
    probe = keras.Model(model.inputs[0], [layer.output for layer in layers])
    own = [keras.ops.convert_to_numpy(value) for value in probe(images)]
    maps = 0
    for layer, reference in zip(layers, own, strict=True):
        var = ds[f"{layer.name}@output"]
        if reference.ndim == 4:
            maps += 1
            assert roles_of(var) == KERAS_IMAGE, (layer.name, roles_of(var))
            assert_lines_up(var, reference.transpose(0, 3, 1, 2), CHANNELS_FIRST, layer.name)
        else:
            assert roles_of(var) == ("batch", "hidden"), (layer.name, roles_of(var))
            assert_same(var, reference, layer.name)
    convolutions = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert maps > len(convolutions) > 20
    assert_same(ds["root@output"], keras.ops.convert_to_numpy(model(images)), "root")
    assert not any("token" in roles_of(var) for var in captures(ds).values())
