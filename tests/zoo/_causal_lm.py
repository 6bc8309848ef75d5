"""Shared checks for decoder-only language models (Llama, Mistral, Qwen2): one trace under eager
attention and one under SDPA, each against the eager model's own ``output_attentions`` and the
traced model's own ``output_hidden_states`` and logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import ATTENTION_ROLES, assert_no_image_roles, attention_variables

IMPLEMENTATIONS = ("eager", "sdpa")
LENGTH = 7
PADDED = 2  # sample 1 of a batch of 3 is left-padded by this many positions

#: a builder gets the attention implementation and returns the model, same weights every call
Build = Callable[[str], nn.Module]


def token_inputs(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, LENGTH), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    if batch > 1:
        mask[1, :PADDED] = 0  # left padding, as for generation: its queries see no key at all
    return ids, mask


def check_causal_lm(tmp_path: Path, build: Build, batch: int, implementation: str,
                    window: int | None = None) -> Any:
    """Trace ``build(implementation)`` on one batch and check every attention map, hidden
    state and the logits; ``window``: the sliding window, keys at or beyond it hold zero."""
    reference_model = build("eager")
    config = reference_model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    ids, mask = token_inputs(batch, config.vocab_size)
    with torch.no_grad():
        reference = reference_model(input_ids=ids, attention_mask=mask, output_attentions=True)

    model = build(implementation)
    assert model.config._attn_implementation == implementation
    path = tmp_path / f"{type(model).__name__}-{implementation}.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ds = layerscope.open_trace(path)

    # every attention layer yields its map, all heads (GQA: more than the key/value heads)
    maps = attention_variables(ds)
    assert set(maps) == {f"model.layers.{i}.self_attn@attention" for i in range(layers)}, maps
    padded_queries = (mask == 0).numpy()  # (batch, query)
    for i in range(layers):
        name = f"model.layers.{i}.self_attn@attention"
        var, expected = maps[name], reference.attentions[i].numpy()
        assert roles_of(var) == ATTENTION_ROLES, (name, roles_of(var))
        assert var.shape == (batch, heads, LENGTH, LENGTH), (name, var.shape)
        values = var.values
        if implementation == "eager":  # the module's own softmax, stored as it was
            np.testing.assert_array_equal(values, expected, err_msg=name)
        else:
            real = ~padded_queries[:, None, :, None]  # broadcast over head and key
            np.testing.assert_allclose(np.where(real, values, 0), np.where(real, expected, 0),
                                       rtol=0, atol=1e-6, err_msg=name)
            # a query that sees no key: SDPA's softmax gives it zeros (eager, a uniform row)
            assert not values[np.broadcast_to(~real, values.shape)].any(), name
        rows = values.sum(-1)[np.broadcast_to(~padded_queries[:, None, :], values.shape[:-1])]
        np.testing.assert_allclose(rows, 1.0, rtol=0, atol=1e-5, err_msg=name)
        real_values = values.transpose(0, 2, 1, 3)[~padded_queries]  # (real query, head, key)
        query = np.nonzero(~padded_queries)[1][:, None, None]
        key = np.arange(LENGTH)
        assert not (real_values * (key > query)).any(), f"{name}: a future key is attended"
        if window is not None:
            outside = query - key >= window
            assert outside.any() and not (real_values * outside).any(), \
                f"{name}: a key outside the window is attended"

    # hidden states, bit for bit: embeddings, each layer's output, the final norm
    hidden = out.hidden_states
    assert len(hidden) == layers + 1
    sites = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(layers - 1)),
             "model.norm"]
    for site, value in zip(sites, hidden, strict=True):
        var = ds[f"{site}@output"]
        assert roles_of(var) == ("batch", "token", "hidden"), (site, roles_of(var))
        np.testing.assert_array_equal(var.values, value.numpy(), err_msg=site)

    # logits: (batch, token, vocabulary), the vocabulary neither hidden nor neuron
    for name in ("lm_head@output", "root@output.logits"):
        var = ds[name]
        roles = roles_of(var)
        assert roles[:2] == ("batch", "token") and roles[2] not in ("hidden", "neuron"), \
            (name, roles)
        assert var.shape == (batch, LENGTH, config.vocab_size)
        np.testing.assert_array_equal(var.values, out.logits.numpy(), err_msg=name)
    assert_no_image_roles(ds)
    return ds
