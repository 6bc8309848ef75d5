"""A Flax NNX decoder-only transformer (causal, grouped-query attention through
jax.nn.dot_product_attention, rotary positions, RMSNorm, gated MLP), tiny and random, run
eagerly and compiled: one causal map per layer equal to the probabilities recomputed from
the layer's own rotated queries and keys, hidden states equal to the modules' own outputs,
and no image roles anywhere (the rotary module's 4-d output is not a map: neutral dims)."""

from __future__ import annotations

from dataclasses import dataclass
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
    assert_close_compiled,
    assert_is_attention,
    assert_no_image_roles,
    assert_same_variables,
    attention_variables,
    trace_nnx,
)

LENGTH = 6


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 40
    hidden_size: int = 16
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # two query heads share each key/value head
    head_dim: int = 4
    mlp_size: int = 24


class RotaryEmbedding(nnx.Module):
    """Rotates (batch, token, head, head_dim) by position."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        half = self.head_dim // 2
        frequencies = 1.0 / 10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
        angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * frequencies
        cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
        first, second = x[..., :half], x[..., half:]
        return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], -1)


class GroupedQueryAttention(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs) -> None:
        width, dim = config.hidden_size, config.head_dim
        self.query = nnx.LinearGeneral(width, (config.num_heads, dim), use_bias=False,
                                       rngs=rngs)
        self.key = nnx.LinearGeneral(width, (config.num_kv_heads, dim), use_bias=False,
                                     rngs=rngs)
        self.value = nnx.LinearGeneral(width, (config.num_kv_heads, dim), use_bias=False,
                                       rngs=rngs)
        self.out = nnx.LinearGeneral((config.num_heads, dim), width, axis=(-2, -1),
                                     use_bias=False, rngs=rngs)
        self.rotary = RotaryEmbedding(dim)

    def projections(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.rotary(self.query(x)), self.rotary(self.key(x)), self.value(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        query, key, value = self.projections(x)
        return self.out(jax.nn.dot_product_attention(query, key, value, is_causal=True))


class GatedMLP(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.gate = nnx.Linear(config.hidden_size, config.mlp_size, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(config.hidden_size, config.mlp_size, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(config.mlp_size, config.hidden_size, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.attention_norm = nnx.RMSNorm(config.hidden_size, rngs=rngs)
        self.attention = GroupedQueryAttention(config, rngs)
        self.mlp_norm = nnx.RMSNorm(config.hidden_size, rngs=rngs)
        self.mlp = GatedMLP(config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs) -> None:
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.norm = nnx.RMSNorm(config.hidden_size, rngs=rngs)
        self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                  rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return CausalLM(DecoderConfig(), nnx.Rngs(0))


def causal_probabilities(query: jax.Array, key: jax.Array) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) over the keys at or before each query, each query head
    reading its group's key head: (batch, head, query, key)."""
    key = jnp.repeat(key, query.shape[2] // key.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
    return np.asarray(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1))


def _own(model: CausalLM, ids: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """Module outputs and attention probabilities, from the model's own submodules."""
    states: dict[str, Any] = {}
    probabilities: dict[str, Any] = {}
    x = states["embed"] = model.embed(ids)
    for i, layer in enumerate(model.layers):
        site = f"layers.{i}"
        normed = states[f"{site}.attention_norm"] = layer.attention_norm(x)
        query, key, _ = layer.attention.projections(normed)
        probabilities[f"{site}.attention"] = causal_probabilities(query, key)
        states[f"{site}.attention"] = layer.attention(normed)
        states[f"{site}.mlp.gate"] = layer.mlp.gate(layer.mlp_norm(x + states[f"{site}.attention"]))
        x = states[site] = layer(x)
    states["norm"] = model.norm(x)
    states["lm_head"] = model.lm_head(states["norm"])
    return states, probabilities


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_causal_maps_and_states(model: CausalLM, batch: int, tmp_path: Path) -> None:
    ids = jnp.asarray(np.random.default_rng(batch).integers(0, 40, (batch, LENGTH)), jnp.int32)
    states, probabilities = _own(model, ids)
    eager = None
    for mode in NNX_MODES[batch]:
        ds, out = trace_nnx(model, (ids,), tmp_path / f"{mode}.zarr", mode,
                            kinds=["output", "attention"])
        stored = attention_variables(ds)
        assert set(stored) == {f"{site}@attention" for site in probabilities}, sorted(stored)
        for site, reference in probabilities.items():
            var = stored[f"{site}@attention"]
            assert_is_attention(var, reference, f"{mode}: {site}")
            assert var.attrs["attention"] == "self"
            upper = np.triu(np.ones((LENGTH, LENGTH), bool), 1)
            assert float(np.abs(var.values[..., upper]).max()) == 0.0  # causal: no future key

        compare = np.testing.assert_array_equal if mode == "eager" else assert_close_compiled
        for site, reference in states.items():
            var = ds[f"{site}@output"]
            feature = "hidden" if reference.shape[-1] == 16 else "neuron"
            assert roles_of(var) == ("batch", "token", feature), (mode, site, roles_of(var))
            compare(var.values, np.asarray(reference), err_msg=f"{mode}: {site}")
        np.testing.assert_array_equal(ds["root@output"].values, np.asarray(out))
        assert roles_of(ds["lm_head@output"]) == ("batch", "token", "neuron")
        for i in range(2):
            attention = f"layers.{i}.attention"
            for part in ("query", "key", "value"):  # per-head projections, kv heads included
                roles = roles_of(ds[f"{attention}.{part}@output"])
                assert roles == ("batch", "token", "head", "axis3"), (part, roles)
            for call in ("output", "output.call1"):  # rotary on queries, then on keys
                roles = roles_of(ds[f"{attention}.rotary@{call}"])
                assert roles == ("batch", "axis1", "axis2", "axis3"), (call, roles)
        assert_no_image_roles(ds)
        if eager is None:
            eager = ds
        else:
            assert_same_variables(ds, eager)

