"""A Flax NNX encoder-decoder (a shared embedding, an ``encoder`` and a ``decoder`` stack of
nnx.MultiHeadAttention layers, an LM head), tiny and random, run eagerly and compiled: the
decoder's positions are ``decoder_token`` / ``decoder_query`` / ``decoder_key`` and the
encoder's ``token`` / ``query`` / ``key``, decided by where each array came from (the cross-
attention's key projection indexes the encoder's positions, the shared embedding's second call
the decoder's); each map equals the layer's own sown weights and says self or cross."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerscope.core.naming import roles_of

from ._zoo import (
    NNX_MODES,
    assert_is_attention,
    assert_no_image_roles,
    assert_same_variables,
    attention_variables,
    trace_nnx,
)

WIDTH, HEADS, VOCAB, SOURCE, TARGET = 16, 4, 40, 7, 5


def _attention(rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, decode=False, rngs=rngs)


class EncoderLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.self_attention = _attention(rngs)
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

    def __call__(self, x: jax.Array, sow: bool) -> jax.Array:
        return self.norm(x + self.self_attention(x, sow_weights=sow))


class DecoderLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.self_attention = _attention(rngs)
        self.cross_attention = _attention(rngs)
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

    def __call__(self, x: jax.Array, memory: jax.Array, sow: bool) -> jax.Array:
        causal = nnx.make_causal_mask(x[..., 0])
        x = x + self.self_attention(x, mask=causal, sow_weights=sow)
        return self.norm(x + self.cross_attention(x, memory, sow_weights=sow))


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([EncoderLayer(rngs) for _ in range(2)])

    def __call__(self, x: jax.Array, sow: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, sow)
        return x


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([DecoderLayer(rngs) for _ in range(2)])

    def __call__(self, x: jax.Array, memory: jax.Array, sow: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, memory, sow)
        return x


class Seq2Seq(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden_size = WIDTH  # the model's width: wider features are neurons
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)  # shared by both stacks
        self.encoder = Encoder(rngs)
        self.decoder = Decoder(rngs)
        self.lm_head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array,
                 sow: bool = False) -> jax.Array:
        memory = self.encoder(self.embed(input_ids), sow)
        return self.lm_head(self.decoder(self.embed(decoder_input_ids), memory, sow))


@pytest.fixture(scope="module")
def model() -> Seq2Seq:
    return Seq2Seq(nnx.Rngs(0))


def axes(var: Any) -> tuple[str, ...]:
    """The stored dim names without the size suffixes (``key_5`` is ``key``)."""
    return tuple(re.sub(r"(?:_\d+){1,2}$", "", str(dim)) for dim in var.dims)


@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_and_decoder_positions_are_named_apart(model: Seq2Seq, batch: int,
                                                       tmp_path: Path) -> None:
    rng = np.random.default_rng(batch)
    ids = jnp.asarray(rng.integers(0, VOCAB, (batch, SOURCE)), jnp.int32)
    decoder_ids = jnp.asarray(rng.integers(0, VOCAB, (batch, TARGET)), jnp.int32)
    _, sown = nnx.capture(model, nnx.Intermediate)(ids, decoder_ids, sow=True)
    expected = {  # site -> (self or cross, dims of the map)
        **{f"encoder.layers.{i}.self_attention": ("self", ("batch", "head", "query", "key"))
           for i in range(2)},
        **{f"decoder.layers.{i}.self_attention":
           ("self", ("batch", "head", "decoder_query", "decoder_key")) for i in range(2)},
        **{f"decoder.layers.{i}.cross_attention":
           ("cross", ("batch", "head", "decoder_query", "key")) for i in range(2)},
    }
    eager = None
    for mode in NNX_MODES[batch]:
        ds, out = trace_nnx(model, (ids,), tmp_path / f"{mode}.zarr", mode,
                            {"decoder_input_ids": decoder_ids}, kinds=["output", "attention"])
        stored = attention_variables(ds)
        assert set(stored) == {f"{site}@attention" for site in expected}, sorted(stored)
        for site, (kind, dims) in expected.items():
            var = stored[f"{site}@attention"]
            weights = sown
            for part in site.split("."):
                weights = weights[int(part) if part.isdigit() else part]
            assert_is_attention(var, weights["attention_weights"].get_value()[0], site)
            assert var.attrs["attention"] == kind and axes(var) == dims, (mode, site, var.dims)

        token = ("batch", "token", "hidden")
        decoder_token = ("batch", "decoder_token", "hidden")
        assert axes(ds["embed@output"]) == token  # the shared embedding, on the source ids
        assert axes(ds["embed@output.call1"]) == decoder_token  # then on the target ids
        for i in range(2):
            assert axes(ds[f"encoder.layers.{i}@output"]) == token
            assert axes(ds[f"decoder.layers.{i}@output"]) == decoder_token
            cross = f"decoder.layers.{i}.cross_attention"
            assert axes(ds[f"{cross}.query@output"])[:2] == ("batch", "decoder_token")
            for part in ("key", "value"):  # projections of the encoder's states
                assert axes(ds[f"{cross}.{part}@output"])[:2] == ("batch", "token"), part
            assert axes(ds[f"{cross}@output"]) == decoder_token
        assert ds["decoder.layers.1@output"].attrs["stack"] == "decoder"
        assert ds["encoder.layers.1@output"].attrs["stack"] == "encoder"
        assert axes(ds["lm_head@output"]) == ("batch", "decoder_token", "neuron")
        assert roles_of(ds["lm_head@output"]) == ("batch", "token", "neuron")  # plain roles
        np.testing.assert_array_equal(ds["root@output"].values, np.asarray(out))
        np.testing.assert_array_equal(ds["token_id"].values, np.asarray(ids))
        np.testing.assert_array_equal(ds["decoder_token_id"].values, np.asarray(decoder_ids))
        assert_no_image_roles(ds)
        if eager is None:
            eager = ds
        else:
            assert_same_variables(ds, eager)
