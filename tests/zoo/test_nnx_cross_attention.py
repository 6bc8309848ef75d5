"""Self- and cross-attention in one Flax NNX model (Perceiver-style: a few learned latents read
the token sequence, attend to each other, and read it again through a hand-written
attention), run eagerly and compiled: each map equals the layer's own probabilities and
says which it is (``attention``: ``self`` or ``cross``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ._zoo import (
    NNX_MODES,
    assert_is_attention,
    assert_no_image_roles,
    assert_same_variables,
    attention_variables,
    trace_nnx,
)

WIDTH, HEADS, LATENTS, LENGTH = 16, 4, 4, 6


class CrossAttention(nnx.Module):
    """Multi-head attention written out: ``x`` attends to ``memory``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        dim = WIDTH // HEADS
        self.query = nnx.LinearGeneral(WIDTH, (HEADS, dim), rngs=rngs)
        self.key = nnx.LinearGeneral(WIDTH, (HEADS, dim), rngs=rngs)
        self.value = nnx.LinearGeneral(WIDTH, (HEADS, dim), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, dim), WIDTH, axis=(-2, -1), rngs=rngs)

    def weights(self, x: jax.Array, memory: jax.Array) -> jax.Array:
        query, key = self.query(x), self.key(memory)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
        return jax.nn.softmax(scores, axis=-1)

    def __call__(self, x: jax.Array, memory: jax.Array) -> jax.Array:
        mixed = jnp.einsum("bhqk,bkhd->bqhd", self.weights(x, memory), self.value(memory))
        return self.out(mixed)


class LatentReader(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(40, WIDTH, rngs=rngs)
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (LATENTS, WIDTH)))
        self.read = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, decode=False,
                                           rngs=rngs)
        self.think = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, decode=False,
                                            rngs=rngs)
        self.reread = CrossAttention(rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array, sow_weights: bool = False) -> jax.Array:
        tokens = self.embed(ids)
        latents = jnp.broadcast_to(self.latents[...], (ids.shape[0], LATENTS, WIDTH))
        keep = mask.astype(bool)[:, None, None, :]
        latents = latents + self.read(latents, tokens, mask=keep, sow_weights=sow_weights)
        latents = latents + self.think(latents, sow_weights=sow_weights)
        return latents + self.reread(latents, tokens)


@pytest.fixture(scope="module")
def model() -> LatentReader:
    return LatentReader(nnx.Rngs(0))


def _own_weights(model: LatentReader, ids: jax.Array, mask: jax.Array) -> dict[str, Any]:
    """The weights the two nnx.MultiHeadAttention layers sow, and the hand-written layer's
    own ``weights`` on the latents it reads with."""
    _, sown = nnx.capture(model, nnx.Intermediate)(ids, mask, sow_weights=True)
    found = {site: sown[site]["attention_weights"].get_value()[0] for site in ("read", "think")}
    tokens = model.embed(ids)
    latents = jnp.broadcast_to(model.latents[...], (ids.shape[0], LATENTS, WIDTH))
    keep = mask.astype(bool)[:, None, None, :]
    latents = latents + model.read(latents, tokens, mask=keep)
    latents = latents + model.think(latents)
    found["reread"] = model.reread.weights(latents, tokens)
    return found


@pytest.mark.parametrize("batch", [1, 3])
def test_self_and_cross_attention_are_told_apart(model: LatentReader, batch: int,
                                                 tmp_path: Path) -> None:
    ids = jnp.asarray(np.random.default_rng(batch).integers(0, 40, (batch, LENGTH)), jnp.int32)
    mask = jnp.ones((batch, LENGTH), jnp.int32).at[-1, LENGTH - 1].set(0)
    own = _own_weights(model, ids, mask)
    which = {"read": "cross", "think": "self", "reread": "cross"}
    eager = None
    for mode in NNX_MODES[batch]:
        ds, _ = trace_nnx(model, (ids, mask), tmp_path / f"{mode}.zarr", mode,
                          capture=["read", "think", "reread"])
        stored = attention_variables(ds)
        assert set(stored) == {f"{site}@attention" for site in which}, sorted(stored)
        for site, kind in which.items():
            var = stored[f"{site}@attention"]
            assert_is_attention(var, own[site], f"{mode}: {site}")
            assert var.attrs["attention"] == kind, (mode, site, var.attrs)
            keys = LATENTS if kind == "self" else LENGTH
            assert var.shape[2:] == (LATENTS, keys), (site, var.shape)
        if mode == "eager":  # the hand-written softmax is stored as computed
            np.testing.assert_array_equal(stored["reread@attention"].values, own["reread"])
        assert float(stored["read@attention"].values[-1, :, :, -1].max()) < 1e-6  # padded key
        assert_no_image_roles(ds)
        if eager is None:
            eager = ds
        else:
            assert_same_variables(ds, eager)
