"""keras-hub Llama (a tiny ``LlamaBackbone`` with grouped-query attention, random weights), on
whichever backend Keras runs on. ``LlamaAttention`` is no ``MultiHeadAttention``: its maps come
from its own ``_masked_softmax``, or, where it takes a fused kernel (JAX, PyTorch), are
recomputed from its own query, key and mask; each equals what the layer's explicit path
returns. Hidden states equal what the layers return; dims are named by role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import pytest
from keras_hub.src.models.llama import llama_attention

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
    keras_attention_sites,
    keras_layers,
)

LAYERS = 2
TOKENS = 6
HEADS, KV_HEADS = 4, 2


def make_llama() -> Any:
    keras.utils.set_random_seed(0)
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=64, num_layers=LAYERS, num_query_heads=HEADS,
        num_key_value_heads=KV_HEADS, hidden_dim=32, intermediate_dim=64)


def llama_inputs(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    lengths = [TOKENS - (row % 3) for row in range(batch)]
    mask = np.arange(TOKENS)[None, :] < np.asarray(lengths)[:, None]
    ids = rng.integers(1, 64, (batch, TOKENS))
    return {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}


@pytest.mark.parametrize("batch", [1, 3])
def test_llama_maps_and_hidden_states(tmp_path: Path, batch: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_llama()
    inputs = llama_inputs(batch)
    path = tmp_path / "llama.zarr"
    with layerscope.trace(model, path):
        model(inputs)
    ds = layerscope.open_trace(path)

    attention = {f"transformer_layers.{i}.self_attention_layer" for i in range(LAYERS)}
    assert {s.path for s in layerscope.sites(model) if s.is_attention} == attention
    assert set(keras_attention_sites(ds)) == attention  # one map per attention layer

    layers = keras_layers(model)
    blocks = [f"transformer_layers.{i}" for i in range(LAYERS)]
    gates = [f"{b}.feedforward_gate_dense" for b in blocks]
    with KerasSpy({s: layers[s] for s in [*blocks, *gates, "token_embedding"]}) as own:
        model(inputs)  # untraced: what the layers return by themselves
    # the layer's explicit path, on every backend: the probabilities its own softmax returns
    monkeypatch.setattr(llama_attention, "fused_attention_op_available", lambda: False)
    with KerasSpy({s: layers[s] for s in attention}, "_masked_softmax") as own_maps:
        model(inputs)
    monkeypatch.undo()
    # on TensorFlow the traced run took that path too; on JAX and PyTorch it took the fused
    # kernel (the map recomputed), so deeper layers see states rounded differently
    explicit = keras.backend.backend() == "tensorflow"

    causal = np.triu(np.ones((TOKENS, TOKENS), bool), 1)
    for site in sorted(attention):
        var = ds[f"{site}@attention"]
        assert var.shape == (batch, HEADS, TOKENS, TOKENS)
        assert_is_attention(var, own_maps[site][0], site)
        if explicit or site == min(attention):  # the first layer sees the same states
            assert_same(var, own_maps[site][0], site)
        assert var.attrs["attention"] == "self"
        assert np.all(var.values[..., causal] == 0), site
        padded_keys = np.broadcast_to(~inputs["padding_mask"][:, None, None, :], var.shape)
        assert np.all(var.values[padded_keys] == 0), site
    for site in [*blocks, "token_embedding"]:
        assert roles_of(ds[f"{site}@output"]) == TOKEN_HIDDEN, site
        assert_same(ds[f"{site}@output"], own[site][0], site)
    for site in gates:
        assert roles_of(ds[f"{site}@output"]) == TOKEN_NEURON, site
        assert_same(ds[f"{site}@output"], own[site][0], site)
    np.testing.assert_array_equal(ds["token_id"].values, inputs["token_ids"])
    first = sorted(attention)[0]
    projection = ("batch", "token", "head", "axis3")
    for part in ("query_dense", "key_dense", "rotary_embedding_layer"):
        assert roles_of(ds[f"{first}.{part}@output"]) == projection, part
    assert ds[f"{first}.key_dense@output"].shape[2] == KV_HEADS  # grouped-query attention
    assert roles_of(ds[f"{first}.softmax@output"]) == ATTENTION_ROLES
    assert_no_image_roles(ds)
    assert_no_channel_on_tokens(ds)
