"""keras-hub BERT (a tiny ``BertBackbone`` with random weights), on whichever backend Keras
runs on: every encoder block's attention map equals the probabilities its own softmax
returns, the hidden states equal what the layers return, dims are named by role.

tests/backends/test_keras_backends.py runs this module on Keras's JAX and PyTorch backends too
and checks that they give the trace the same variables, dims and roles as TensorFlow."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import pytest

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import (
    ATTENTION_ROLES,
    TOKEN_HIDDEN,
    TOKEN_NEURON,
    KerasSpy,
    assert_is_attention,
    assert_no_channel_on_tokens,
    assert_no_image_roles,
    assert_same,
    captures,
    keras_attention_sites,
    keras_layers,
)

LAYERS = 2
TOKENS = 7
#: where the JAX / PyTorch runs of this module leave their trace's layout for the comparison
LAYOUT_OUT = "LAYERSCOPE_KERAS_LAYOUT_OUT"


def make_bert() -> Any:
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=LAYERS, num_heads=4, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=16)


def bert_inputs(batch: int) -> dict[str, np.ndarray]:
    """Token ids with the rows padded to different lengths (the mask matters)."""
    rng = np.random.default_rng(batch)
    ids = rng.integers(1, 64, (batch, TOKENS)).astype("int32")
    lengths = [TOKENS - (row % 3) for row in range(batch)]
    mask = np.arange(TOKENS)[None, :] < np.asarray(lengths)[:, None]
    return {"token_ids": np.where(mask, ids, 0).astype("int32"),
            "segment_ids": np.zeros_like(ids), "padding_mask": mask}


def layout(ds: Any) -> dict[str, Any]:
    """What must not depend on the backend: each variable's dims, roles and labels."""
    return {name: {"dims": list(var.dims), "roles": list(roles_of(var)),
                   "attention": var.attrs.get("attention")}
            for name, var in sorted(captures(ds).items())}


def trace_bert(path: Path, batch: int) -> tuple[Any, Any, dict[str, np.ndarray]]:
    model = make_bert()
    inputs = bert_inputs(batch)
    with layerscope.trace(model, path):
        model(inputs)
    return model, layerscope.open_trace(path), inputs


@pytest.mark.parametrize("batch", [1, 3])
def test_bert_maps_and_hidden_states(tmp_path: Path, batch: int) -> None:
    model, ds, inputs = trace_bert(tmp_path / "bert.zarr", batch)
    assert ds.attrs["framework"] == f"keras/{keras.backend.backend()}"
    layers = keras_layers(model)
    attention = {f"transformer_layers.{i}.self_attention_layer" for i in range(LAYERS)}
    assert {s.path for s in layerscope.sites(model) if s.is_attention} == attention
    assert set(keras_attention_sites(ds)) == attention  # one map per attention layer

    blocks = [f"transformer_layers.{i}" for i in range(LAYERS)]
    inner = [f"{b}.feedforward_intermediate_dense" for b in blocks]
    with KerasSpy({s: layers[s] for s in attention}, "_masked_softmax") as own_maps, \
            KerasSpy({s: layers[s] for s in [*blocks, *inner, "embeddings_layer_norm"]}) as own:
        model(inputs)  # the same model, untraced: what its layers return by themselves

    for site in sorted(attention):
        var = ds[f"{site}@attention"]
        assert_is_attention(var, own_maps[site][0], site)
        assert_same(var, own_maps[site][0], site)
        assert var.attrs["attention"] == "self"
        padded_keys = np.broadcast_to(~inputs["padding_mask"][:, None, None, :], var.shape)
        assert np.all(var.values[padded_keys] == 0), site  # the padding mask was applied
    for site in [*blocks, "embeddings_layer_norm"]:
        var = ds[f"{site}@output"]
        assert roles_of(var) == TOKEN_HIDDEN, (site, roles_of(var))
        assert_same(var, own[site][0], site)
    for site in inner:
        assert roles_of(ds[f"{site}@output"]) == TOKEN_NEURON
        assert_same(ds[f"{site}@output"], own[site][0], site)
    # the functional graph's own outputs: the last block's states, and the pooled output
    out = model(inputs)
    assert_same(ds["root@output.sequence_output"], keras.ops.convert_to_numpy(
        out["sequence_output"]), "sequence_output")
    assert roles_of(ds["root@output.pooled_output"]) == ("batch", "hidden")
    np.testing.assert_array_equal(ds["token_id"].values, inputs["token_ids"])
    assert roles_of(ds[f"{sorted(attention)[0]}.query_dense@output"]) == (
        "batch", "token", "head", "axis3")
    assert roles_of(ds[f"{sorted(attention)[0]}.softmax@output"]) == ATTENTION_ROLES
    assert_no_image_roles(ds)
    assert_no_channel_on_tokens(ds)
    if batch == 3 and os.environ.get(LAYOUT_OUT):
        Path(os.environ[LAYOUT_OUT]).write_text(json.dumps(layout(ds)))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.function exists on Keras's TensorFlow backend only")
def test_bert_inside_tf_function_traces_as_eager(tmp_path: Path) -> None:
    """The backbone called inside a ``tf.function`` graph: the same variables, dims and roles
    as the eager trace, and the values the eager run recorded."""
    import tensorflow as tf

    _, eager, inputs = trace_bert(tmp_path / "eager.zarr", 3)
    model = make_bert()
    step = tf.function(lambda batch: model(batch))
    path = tmp_path / "graph.zarr"
    with layerscope.trace(model, path):
        step({name: tf.constant(value) for name, value in inputs.items()})
    graph = layerscope.open_trace(path)
    assert layout(graph) == layout(eager)
    for name, var in captures(eager).items():
        np.testing.assert_allclose(graph[name].values, var.values, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
