"""Reductions and token positions in JAX (a tiny Flax NNX transformer with padding masks),
eagerly and under ``nnx.jit``, where they run inside the compiled function and only their
results leave it: every stored reduction equals the same reduction in NumPy over what the
blocks return when called by themselves, for left- and right-padded batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layerscope
from tests import reduce_reference as ref

LAYERS = 2
WIDTH = 16


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=WIDTH, decode=False,
                                                rngs=rngs)
        self.up = nnx.Linear(WIDTH, 3 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(3 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(x, mask=mask[:, None, None, :])
        return x + self.down(nnx.gelu(self.up(x)))


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(50, WIDTH, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask != 0)
        return x


def inputs(side: str) -> tuple[jax.Array, jax.Array]:
    ids = np.random.default_rng(4).integers(1, 50, (3, 7))
    mask = np.zeros((3, 7), np.int32)
    for row, real in enumerate((7, 4, 2)):
        if side == "left":
            mask[row, 7 - real:] = 1
        else:
            mask[row, :real] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def own_outputs(model: Encoder, ids: jax.Array, mask: jax.Array) -> dict[str, np.ndarray]:
    """Each block's output, the blocks called one by one outside any trace."""
    x, seen = model.embed(ids), {}
    for i, layer in enumerate(model.layers):
        x = layer(x, mask != 0)
        seen[f"layers.{i}"] = np.asarray(x)
    return seen


SPECS = "output:last,output:mean,output:norm,output:topk(5),output:slice(0:3),output:mask"


@pytest.mark.parametrize("mode", ["eager", "nnx.jit"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_reductions_equal_numpy_over_the_blocks_own_outputs(tmp_path: Path, side: str,
                                                             mode: str) -> None:
    model = Encoder(nnx.Rngs(0))
    ids, mask = inputs(side)
    own = own_outputs(model, ids, mask)
    path = tmp_path / "r.zarr"
    # compiled, the blocks may round unlike eager: their stored whole outputs are the reference
    specs = SPECS if mode == "eager" else f"output,{SPECS}"
    with layerscope.trace(model, path, [f"layers.?@{specs}", "layers.*.attention@attention:last"]):
        if mode == "eager":
            model(input_ids=ids, attention_mask=mask)
        else:
            nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a))(model, ids, mask)
    ds = layerscope.open_trace(path)
    real = np.asarray(mask)
    np.testing.assert_array_equal(ds["token_mask"].values, real.astype(bool))
    whole = [n for n in layerscope.captured_names(ds) if n.endswith(("@output", "@attention"))]
    assert len(whole) == (0 if mode == "eager" else LAYERS), whole
    for site, expected in own.items():
        x = expected if mode == "eager" else ds[f"{site}@output"].values
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ds[f"{site}@output:last(token)"].values, ref.last(x, real))
        np.testing.assert_allclose(ds[f"{site}@output:mean(token)"].values, ref.mean(x, real),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds[f"{site}@output:norm(hidden)"].values, ref.norm(x),
                                   rtol=1e-5)
        values, index = ref.topk(x, 5)
        np.testing.assert_array_equal(ds[f"{site}@output:topk(hidden,5)"].values, values)
        np.testing.assert_array_equal(ds[f"{site}@output:topk(hidden,5):index"].values, index)
        np.testing.assert_array_equal(ds[f"{site}@output:slice(token,0:3)"].values,
                                      ref.positions(x, real, 0, 3))
        np.testing.assert_array_equal(ds[f"{site}@output:mask(token)"].values,
                                      ref.masked(x, real).astype(np.float32))
        maps = ds[f"{site}.attention@attention:last(query)"]
        assert maps.dims == ("batch", "head", "key")
        rows = maps.values.sum(axis=-1)  # a softmax row each: the last real query's
        np.testing.assert_allclose(rows, 1.0, rtol=1e-5)


def test_reduce_keyword_under_jit_sends_only_the_reductions(tmp_path: Path) -> None:
    """``reduce=`` through ``layerscope.trace``; a second call of the compiled function (no
    retrace) stores its own values."""
    model = Encoder(nnx.Rngs(1))
    forward = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a))
    path = tmp_path / "k.zarr"
    batches = [inputs("left"), inputs("right")]
    with layerscope.trace(model, path, "layers.?@output", reduce="mean"):
        for ids, mask in batches:
            forward(model, ids, mask)
    ds = layerscope.open_trace(path)
    assert layerscope.captured_names(ds) == [f"layers.{i}@output:mean(token)"
                                             for i in range(LAYERS)]
    stored: Any = ds["layers.1@output:mean(token)"].values
    for number, (ids, mask) in enumerate(batches):
        own = own_outputs(model, ids, mask)["layers.1"]
        np.testing.assert_allclose(stored[3 * number:3 * number + 3],
                                   ref.mean(own, np.asarray(mask)), rtol=1e-5, atol=1e-5)


class Unmasked(nnx.Module):
    """Blocks called with token ids alone: no mask, every position real."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(50, WIDTH, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(LAYERS)])

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = nnx.tanh(layer(x))
        return x


@pytest.mark.parametrize("mode", ["eager", "nnx.jit"])
def test_positions_without_a_mask_are_the_same_positions_of_every_sample(tmp_path: Path,
                                                                         mode: str) -> None:
    model = Unmasked(nnx.Rngs(2))
    ids = jnp.asarray(np.random.default_rng(5).integers(1, 50, (3, 7)))
    path = tmp_path / "p.zarr"
    specs = "output,output:last,output:first,output:slice(1:3),output:slice(-2:)"
    with layerscope.trace(model, path, f"layers.?@{specs}"):
        if mode == "eager":
            model(input_ids=ids)
        else:
            nnx.jit(lambda m, i: m(input_ids=i))(model, ids)
    ds = layerscope.open_trace(path)
    for index in range(LAYERS):
        site = f"layers.{index}"
        x = ds[f"{site}@output"].values  # compiled, the blocks may round unlike eager
        np.testing.assert_array_equal(ds[f"{site}@output:last(token)"].values, x[:, -1])
        np.testing.assert_array_equal(ds[f"{site}@output:first(token)"].values, x[:, 0])
        np.testing.assert_array_equal(ds[f"{site}@output:slice(token,1:3)"].values, x[:, 1:3])
        np.testing.assert_array_equal(ds[f"{site}@output:slice(token,-2:)"].values, x[:, -2:])
