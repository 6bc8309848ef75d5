"""A Flax NNX CNN (nnx.Conv, nnx.BatchNorm and nnx.LayerNorm, a pointwise nnx.Linear over
channels, max pooling, an nnx.Linear head) on small non-square images, run eagerly and
compiled: every map is stored channels-last as Flax made it, labeled (batch, height, width,
channel), so that by dim names it equals the channels-first (batch, channel, height, width)
view of the module's own output; the head is (batch, hidden)."""

from __future__ import annotations

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
    assert_lines_up,
    assert_no_channel_on_tokens,
    assert_same_variables,
    attention_variables,
    captures,
    trace_nnx,
)

HEIGHT, WIDTH, COLORS = 12, 16, 3
CHANNELS_FIRST = ("batch", "channel", "height", "width")


class ConvBlock(nnx.Module):
    def __init__(self, channels_in: int, channels_out: int, norm: str, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(channels_in, channels_out, (3, 3), padding="SAME", rngs=rngs)
        if norm == "batch":
            self.norm: nnx.Module = nnx.BatchNorm(channels_out, use_running_average=True,
                                                  rngs=rngs)
        else:
            self.norm = nnx.LayerNorm(channels_out, rngs=rngs)
        self.mix = nnx.Linear(channels_out, channels_out, rngs=rngs)  # a 1x1 convolution

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mix(nnx.relu(self.norm(self.conv(x))))
        return nnx.max_pool(x, (2, 2), strides=(2, 2))


class SmallCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([ConvBlock(COLORS, 5, "batch", rngs),
                                ConvBlock(5, 7, "layer", rngs)])
        self.head = nnx.Linear(7 * (HEIGHT // 4) * (WIDTH // 4), 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for block in self.blocks:
            x = block(x)
        return self.head(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    model = SmallCNN(nnx.Rngs(0))
    norm = model.blocks[0].norm  # running statistics of a trained model, not 0 and 1
    rng = np.random.default_rng(0)
    norm.mean.set_value(jnp.asarray(rng.standard_normal(5), jnp.float32))
    norm.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32))
    return model


def _own(model: SmallCNN, images: jax.Array) -> dict[str, Any]:
    """Each module's output, channels-last as Flax returns it, from its own submodules."""
    found: dict[str, Any] = {}
    x = images
    for i, block in enumerate(model.blocks):
        site = f"blocks.{i}"
        conv = found[f"{site}.conv"] = block.conv(x)
        norm = found[f"{site}.norm"] = block.norm(conv)
        found[f"{site}.mix"] = block.mix(nnx.relu(norm))
        x = found[site] = block(x)
    found["head"] = model.head(x.reshape(x.shape[0], -1))
    return found


@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_maps_line_up_by_name(model: SmallCNN, batch: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(batch)
    images = jnp.asarray(rng.standard_normal((batch, HEIGHT, WIDTH, COLORS)), jnp.float32)
    own = _own(model, images)
    eager = None
    for mode in NNX_MODES[batch]:
        ds, out = trace_nnx(model, (images,), tmp_path / f"{mode}.zarr", mode)
        exact = mode == "eager"
        for site, reference in own.items():
            var = ds[f"{site}@output"]
            if reference.ndim == 4:
                assert roles_of(var) == ("batch", "height", "width", "channel"), (site, mode)
                channels_first = np.transpose(np.asarray(reference), (0, 3, 1, 2))
                assert_lines_up(var, channels_first, CHANNELS_FIRST, f"{mode}: {site}", exact)
            else:
                assert roles_of(var) == ("batch", "hidden"), (site, mode)
                assert_lines_up(var, reference, ("batch", "hidden"), f"{mode}: {site}", exact)
        np.testing.assert_array_equal(ds["root@output"].values, np.asarray(out))
        conv = ds["blocks.1.conv@output"]  # sizes tell the axes apart: 6 x 8 pixels, 7 channels
        assert conv.sizes[conv.dims[1]] == HEIGHT // 2 and conv.sizes[conv.dims[3]] == 7
        assert not attention_variables(ds)
        assert not any("token" in roles_of(var) for var in captures(ds).values())
        assert_no_channel_on_tokens(ds)
        if eager is None:
            eager = ds
        else:
            assert_same_variables(ds, eager)
