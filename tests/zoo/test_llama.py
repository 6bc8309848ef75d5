"""Llama: grouped-query attention (2 key/value heads for 4 query heads) and rotary positions,
under eager attention and SDPA, at batch 1 and 3 (left-padded), for a whole prompt and for one
cached decoding step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import layerscope
from layerscope.core.naming import roles_of

from ._causal_lm import IMPLEMENTATIONS, check_causal_lm, token_inputs
from ._zoo import ATTENTION_ROLES, attention_variables

LAYERS = 2


def build(implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation=implementation)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_llama_prompt(tmp_path, batch, implementation):
    check_causal_lm(tmp_path, build, batch, implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_llama_one_cached_step(tmp_path, batch, implementation):
    """One new token over a cache: (batch, head, 1, key) for all 4 heads. Under SDPA with a
    padding mask transformers packs the query heads onto the 2 key/value heads; the map is
    unpacked back."""
    ids, mask = token_inputs(batch, 80)
    step_ids = torch.randint(3, 80, (batch, 1), generator=torch.Generator().manual_seed(7))
    step_mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)

    def step(model: LlamaForCausalLM, **kwargs):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            return model(input_ids=step_ids, attention_mask=step_mask, cache=cache,
                         use_cache=True, **kwargs)

    reference = step(build("eager"), output_attentions=True)
    model = build(implementation)
    path = tmp_path / "llama-step.zarr"
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # the prompt outside the trace: only the step is stored
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    with layerscope.trace(model, path, kinds=["attention"]), torch.no_grad():
        model(input_ids=step_ids, attention_mask=step_mask, cache=cache, use_cache=True)
    maps = attention_variables(layerscope.open_trace(path))
    assert set(maps) == {f"model.layers.{i}.self_attn@attention" for i in range(LAYERS)}
    for i in range(LAYERS):
        name = f"model.layers.{i}.self_attn@attention"
        var = maps[name]
        assert roles_of(var) == ATTENTION_ROLES
        assert var.shape == (batch, 4, 1, ids.shape[1] + 1), var.shape
        np.testing.assert_allclose(var.values, reference.attentions[i].numpy(), rtol=0,
                                   atol=1e-6, err_msg=name)


@pytest.mark.parametrize("autocast", [False, True], ids=["bfloat16", "autocast"])
def test_half_precision_maps_are_recomputed_in_float32(tmp_path, autocast):
    """A bfloat16 model (or float32 under bfloat16 autocast) under SDPA: the recomputed maps
    are float32 softmaxes (rows sum to 1 within float32's precision, where bfloat16 arithmetic
    would be off by 1e-3) and equal eager attention within bfloat16's precision."""
    ids, mask = token_inputs(3, 80)
    eager = build("eager") if autocast else build("eager").to(torch.bfloat16)
    model = build("sdpa") if autocast else build("sdpa").to(torch.bfloat16)
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), context:
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    path = tmp_path / "half.zarr"
    with layerscope.trace(model, path, kinds=["attention"]), torch.no_grad(), context:
        model(input_ids=ids, attention_mask=mask)
    ds = layerscope.open_trace(path)
    stored = attention_variables(ds)
    assert len(stored) == LAYERS
    real = mask.numpy().astype(bool)[:, None, :, None]  # rows of real (not padded) queries
    for i, (name, var) in enumerate(sorted(stored.items())):
        values = var.values
        assert values.dtype == np.float32, values.dtype
        rows = np.broadcast_to(real, values.shape[:-1] + (1,))[..., 0]
        np.testing.assert_allclose(values.sum(-1)[rows], 1.0, rtol=0, atol=1e-5, err_msg=name)
        expected = reference.attentions[i].float().numpy()
        np.testing.assert_allclose(values[rows], expected[rows], rtol=0, atol=2e-2, err_msg=name)
