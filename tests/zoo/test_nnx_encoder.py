"""A Flax NNX transformer encoder (the BERT port of examples/minilm, tiny and random), run
eagerly, under nnx.jit and under jax.jit: every attention layer's map equals the weights its
own nnx.MultiHeadAttention sows, every hidden state the output of the module that made it,
and the dims are (batch, head, query, key) and (batch, token, hidden|neuron), never an
image's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
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
    captures,
    trace_nnx,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minilm" / "flax_bert.py"
LAYERS, WIDTH, INNER, LENGTH = 2, 16, 24, 6


def _port() -> ModuleType:
    """examples/minilm/flax_bert.py, loaded once (its dataclass needs a module by name)."""
    loaded = sys.modules.get("flax_bert")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("flax_bert", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["flax_bert"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> Any:
    port = _port()
    config = port.BertConfig(vocab_size=50, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                             num_attention_heads=4, intermediate_size=INNER,
                             max_position_embeddings=16)
    return port.FlaxBertModel(config, nnx.Rngs(0))


def _inputs(batch: int) -> tuple[jax.Array, jax.Array]:
    ids = np.random.default_rng(batch).integers(0, 50, (batch, LENGTH))
    mask = np.ones((batch, LENGTH), np.int32)
    if batch > 1:
        mask[1, LENGTH - 2:] = 0  # a padded sample: its padded keys get no probability
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def _own(model: Any, ids: jax.Array, mask: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each module's output and each layer's sown attention weights, by calling the model's
    own submodules on the inputs the model gives them."""
    keep = jnp.asarray(mask).astype(bool)[:, None, None, :]
    states: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    x = states["embeddings"] = model.embeddings(ids, jnp.zeros_like(ids))
    for i, layer in enumerate(model.encoder.layer):
        site = f"encoder.layer.{i}"
        attended = states[f"{site}.attention"] = layer.attention(x, mask=keep)
        _, sown = nnx.capture(layer.attention, nnx.Intermediate)(x, mask=keep, sow_weights=True)
        (weights[f"{site}.attention"],) = sown["attention_weights"].get_value()
        normed = states[f"{site}.attention_norm"] = layer.attention_norm(attended + x)
        inner = states[f"{site}.intermediate"] = layer.intermediate(normed)
        x = states[f"{site}.output"] = states[site] = layer.output(inner, normed)
    states["encoder"] = x
    states["pooler"] = model.pooler(x)
    return states, weights


@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_maps_and_states_in_every_mode(model: Any, batch: int, tmp_path: Path) -> None:
    ids, mask = _inputs(batch)
    states, weights = _own(model, ids, mask)
    eager = None
    for mode in NNX_MODES[batch]:
        ds, out = trace_nnx(model, (ids, mask), tmp_path / f"{mode}.zarr", mode,
                            kinds=["output", "attention"])
        exact = mode == "eager"

        # one map per attention layer, no more and no fewer, each the layer's own weights
        stored = attention_variables(ds)
        assert set(stored) == {f"{site}@attention" for site in weights}, sorted(stored)
        for site, reference in weights.items():
            var = stored[f"{site}@attention"]
            assert_is_attention(var, reference, f"{mode}: {site}")
            assert var.attrs["attention"] == "self"
            if batch > 1:  # padded keys of sample 1
                assert float(np.abs(var.values[1, :, :, LENGTH - 2:]).max()) < 1e-6

        for site, reference in states.items():
            var = ds[f"{site}@output"]
            feature = "hidden" if reference.shape[-1] == WIDTH else "neuron"
            expected = ("batch", feature) if reference.ndim == 2 else ("batch", "token", feature)
            assert roles_of(var) == expected, (mode, site, roles_of(var))
            compare = np.testing.assert_array_equal if exact else assert_close_compiled
            compare(var.values, np.asarray(reference), err_msg=f"{mode}: {site}")
        assert roles_of(ds["encoder.layer.0.intermediate@output"])[-1] == "neuron"
        assert roles_of(ds["pooler@output"]) == ("batch", "hidden")
        np.testing.assert_array_equal(ds["root@output.last_hidden_state"].values,
                                      np.asarray(out["last_hidden_state"]))
        np.testing.assert_array_equal(ds["token_id"].values, np.asarray(ids))
        for name, var in captures(ds).items():  # per-head projections keep their head axis
            if name.endswith((".query@output", ".key@output", ".value@output")):
                assert roles_of(var) == ("batch", "token", "head", "axis3"), name
        assert "stack" not in ds["encoder.layer.0@output"].attrs  # an encoder alone: no stacks
        assert_no_image_roles(ds)
        if eager is None:
            eager = ds
        else:
            assert_same_variables(ds, eager)

