"""keras-hub GPT-2 (a tiny ``GPT2Backbone`` without dropout, random weights). Without dropout
its attention layers (``CachedMultiHeadAttention``) take the fused kernel, which returns no
probabilities: each captured map is recomputed, and must equal what the same layer returns
when asked for its scores on the same inputs and mask. Dense layers are (batch, token,
hidden|neuron), never a convolution's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np
import pytest

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import (
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


def make_gpt2() -> Any:
    keras.utils.set_random_seed(0)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=LAYERS, num_heads=4, hidden_dim=32, intermediate_dim=64,
        dropout=0.0, max_sequence_length=16)


class CallArguments:
    """``with CallArguments(layers) as calls:`` the arguments of every call of each layer."""

    def __init__(self, layers: dict[str, Any]) -> None:
        self.layers = layers
        self.calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {s: [] for s in layers}

    def __enter__(self) -> dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
        for site, layer in self.layers.items():
            def call(*args: Any, _site: str = site, _call: Any = layer.call, **kwargs: Any) -> Any:
                self.calls[_site].append((args, kwargs))
                return _call(*args, **kwargs)

            object.__setattr__(layer, "call", call)
        return self.calls

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers.values():
            object.__delattr__(layer, "call")


@pytest.mark.parametrize("batch", [1, 3])
def test_gpt2_fused_attention_maps_and_dense_layers(tmp_path: Path, batch: int) -> None:
    model = make_gpt2()
    rng = np.random.default_rng(batch)
    inputs = {"token_ids": rng.integers(1, 64, (batch, TOKENS)).astype("int32"),
              "padding_mask": np.ones((batch, TOKENS), bool)}
    path = tmp_path / "gpt2.zarr"
    with layerscope.trace(model, path):
        model(inputs)
    ds = layerscope.open_trace(path)

    attention = {f"transformer_layers.{i}.self_attention_layer" for i in range(LAYERS)}
    assert {s.path for s in layerscope.sites(model) if s.is_attention} == attention
    assert set(keras_attention_sites(ds)) == attention

    layers = keras_layers(model)
    blocks = [f"transformer_layers.{i}" for i in range(LAYERS)]
    dense = [f"{b}.{name}" for b in blocks
             for name in ("feedforward_intermediate_dense", "feedforward_output_dense")]
    with CallArguments({s: layers[s] for s in attention}) as calls, \
            KerasSpy({s: layers[s] for s in [*blocks, *dense]}) as own:
        model(inputs)
    causal = np.triu(np.ones((TOKENS, TOKENS), bool), 1)
    for site in sorted(attention):
        (args, kwargs), = calls[site]
        # the layer's own explicit path: asked for its scores, on the same inputs and mask
        _, scores = layers[site](*args, **{**kwargs, "return_attention_scores": True})
        reference = keras.ops.convert_to_numpy(scores)
        var = ds[f"{site}@attention"]
        assert_is_attention(var, reference, site)
        assert_same(var, reference, site)
        assert var.attrs["attention"] == "self"
        assert np.all(var.values[..., causal] == 0), site
    for site in [*blocks, *dense]:
        expected = TOKEN_NEURON if site.endswith("intermediate_dense") else TOKEN_HIDDEN
        assert roles_of(ds[f"{site}@output"]) == expected, (site, roles_of(ds[f"{site}@output"]))
        assert_same(ds[f"{site}@output"], own[site][0], site)
    # the functional graph ends at the last block: its output is the backbone's
    assert_same(ds["root@output"], keras.ops.convert_to_numpy(model(inputs)), "root")
    assert_no_image_roles(ds)
    assert_no_channel_on_tokens(ds)
