"""Reductions and token positions in Keras 3 (keras-hub GPT-2 and BERT backbones built from
arguments, random weights), eagerly and, on TensorFlow, inside a ``tf.function`` graph, where
the reductions become part of the graph: every stored reduction equals the same reduction in
NumPy over what the blocks themselves returned, by the backbone's ``padding_mask`` (right and
left padding). tests/backends/test_keras_backends.py runs this module on Keras's JAX and
PyTorch backends too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import pytest

import layerscope
from tests import reduce_reference as ref
from tests.zoo._zoo import KerasSpy

LAYERS = 2
TOKENS = 7
SPECS = "output:last,output:mean,output:norm,output:topk(5),output:slice(-3:)"


def gpt2() -> Any:
    keras.utils.set_random_seed(0)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=LAYERS, num_heads=4, hidden_dim=32, intermediate_dim=64,
        dropout=0.0, max_sequence_length=16)


def bert() -> Any:
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=LAYERS, num_heads=4, hidden_dim=32, intermediate_dim=64,
        dropout=0.0, max_sequence_length=16)


def inputs(side: str, segments: bool) -> dict[str, np.ndarray]:
    """Rows 7, 4 and 2 tokens long, padded on ``side``."""
    ids = np.random.default_rng(2).integers(1, 64, (3, TOKENS)).astype("int32")
    mask = np.zeros((3, TOKENS), bool)
    for row, real in enumerate((7, 4, 2)):
        if side == "left":
            mask[row, TOKENS - real:] = True
        else:
            mask[row, :real] = True
    given = {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}
    if segments:
        given["segment_ids"] = np.zeros_like(ids)
    return given


MODELS = {"gpt2-right": (gpt2, "right", False), "bert-left": (bert, "left", True)}
MODES = ["eager"] + (["graph"] if keras.backend.backend() == "tensorflow" else [])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(MODELS))
def test_reductions_equal_numpy_over_the_blocks_own_outputs(tmp_path: Path, case: str,
                                                             mode: str) -> None:
    build, side, segments = MODELS[case]
    model, given = build(), inputs(side, segments)
    sites = {f"transformer_layers.{i}": model.transformer_layers[i] for i in range(LAYERS)}
    with KerasSpy(sites) as seen:
        model(given)
    path = tmp_path / "r.zarr"
    if mode == "graph":  # the graph's own block outputs beside: it may round unlike eager
        import tensorflow as tf

        with layerscope.trace(model, path, f"transformer_layers.?@output,{SPECS}"):
            tf.function(lambda x: model(x))(given)
    else:
        with layerscope.trace(model, path, f"transformer_layers.?@{SPECS}"):
            model(given)
    ds = layerscope.open_trace(path)
    mask = given["padding_mask"]
    np.testing.assert_array_equal(ds["token_mask"].values, mask)
    whole = [n for n in layerscope.captured_names(ds) if n.endswith("@output")]
    assert len(whole) == (LAYERS if mode == "graph" else 0), whole
    for site in sites:
        x = ds[f"{site}@output"].values if mode == "graph" else seen[site][0]
        np.testing.assert_allclose(x, seen[site][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ds[f"{site}@output:last(token)"].values, ref.last(x, mask))
        np.testing.assert_allclose(ds[f"{site}@output:mean(token)"].values, ref.mean(x, mask),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds[f"{site}@output:norm(hidden)"].values, ref.norm(x),
                                   rtol=1e-5)
        values, index = ref.topk(x, 5)
        np.testing.assert_array_equal(ds[f"{site}@output:topk(hidden,5)"].values, values)
        np.testing.assert_array_equal(ds[f"{site}@output:topk(hidden,5):index"].values, index)
        assert ds[f"{site}@output:topk(hidden,5):index"].dims == ("batch", "token", "k")
        np.testing.assert_array_equal(ds[f"{site}@output:slice(token,-3:)"].values,
                                      ref.positions(x, mask, -3, None))


def test_positions_keyword_through_capture(tmp_path: Path) -> None:
    model, given = gpt2(), inputs("right", False)
    site = "transformer_layers.1"
    with KerasSpy({site: model.transformer_layers[1]}) as seen:
        model(given)
    ds = layerscope.capture(model, [given], tmp_path / "k.zarr", f"{site}@output",
                            positions="first")
    assert layerscope.captured_names(ds) == [f"{site}@output:first(token)"]
    np.testing.assert_array_equal(ds[f"{site}@output:first(token)"].values,
                                  ref.first(seen[site][0], given["padding_mask"]))


def test_a_trace_whose_every_tensor_is_skipped_says_so(tmp_path: Path) -> None:
    """As in PyTorch (tests/backends/test_reduce_torch.py): the last token of a Keras CNN's
    outputs, which have no token axis, is nothing to capture, and the trace says so."""
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype("float32")
    path = tmp_path / "cnn.zarr"
    with pytest.warns(UserWarning, match=r"nothing was captured .* in 1 passes.*no token axis"):
        with layerscope.trace(cnn, path, positions="last") as active:
            active(x)
    ds = layerscope.open_trace(path)
    assert not ds.data_vars and ds.attrs["skipped"]


def test_positions_without_a_mask_are_the_same_positions_of_every_sample(tmp_path: Path):
    """A model given token ids alone: every position is real, each position a plain slice."""
    keras.utils.set_random_seed(0)
    ids_in = keras.Input((TOKENS,), dtype="int32", name="token_ids")
    hidden = keras.layers.Embedding(64, 16, name="embed")(ids_in)
    hidden = keras.layers.Dense(16, activation="tanh", name="block")(hidden)
    model = keras.Model(ids_in, hidden)
    ids = np.random.default_rng(5).integers(1, 64, (3, TOKENS)).astype("int32")
    path = tmp_path / "p.zarr"
    specs = "output,output:last,output:first,output:slice(1:3),output:slice(-2:)"
    with layerscope.trace(model, path, f"block@{specs}") as active:
        active(ids)
    ds = layerscope.open_trace(path)
    x = ds["block@output"].values
    np.testing.assert_allclose(x, keras.ops.convert_to_numpy(model(ids)), rtol=1e-6)
    np.testing.assert_array_equal(ds["block@output:last(token)"].values, x[:, -1])
    np.testing.assert_array_equal(ds["block@output:first(token)"].values, x[:, 0])
    np.testing.assert_array_equal(ds["block@output:slice(token,1:3)"].values, x[:, 1:3])
    np.testing.assert_array_equal(ds["block@output:slice(token,-2:)"].values, x[:, -2:])
