"""Mixture-of-experts (Mixtral, Qwen2-MoE): the router flattens batch and token into rows; its
logits are stored back on (batch, token, expert), its top-k weights and indices on
(batch, token, <neutral>), equal to the router's own outputs; the experts' mix (one row per
token: transformers fuses the experts, so no expert's own output exists) goes back on
(batch, token, hidden); what the modules inside the experts compute on the flattened rows
has no batch axis and is skipped, with the reason, never stored as if batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import layerscope
from layerscope.core.naming import roles_of

LAYERS, EXPERTS, TOP_K = 2, 4, 2


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shared = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=TOP_K,
                  max_position_embeddings=64, attn_implementation="eager")
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(num_local_experts=EXPERTS, **shared)).eval()
    config = Qwen2MoeConfig(num_experts=EXPERTS, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, **shared)
    return Qwen2MoeForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize(("batch", "length"), [(1, 5), (3, 5), (3, 1)])
def test_router_rows_back_on_batch_and_token(tmp_path, family, batch, length):
    model = _model(family)
    ids = torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(batch))
    own: dict[int, tuple[torch.Tensor, ...]] = {}
    mixed: dict[int, torch.Tensor] = {}
    handles = [layer.mlp.gate.register_forward_hook(
        lambda m, a, o, i=i: own.setdefault(i, tuple(t.clone() for t in o)))
        for i, layer in enumerate(model.model.layers)]
    handles += [layer.mlp.experts.register_forward_hook(
        lambda m, a, o, i=i: mixed.setdefault(i, o.clone()))
        for i, layer in enumerate(model.model.layers)]
    path = tmp_path / f"{family}.zarr"
    try:
        with layerscope.trace(model, path), torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    ds = layerscope.open_trace(path)

    assert len(own) == LAYERS
    for i in range(LAYERS):
        logits, weights, chosen = own[i]
        assert logits.shape == (batch * length, EXPERTS)  # the router's own rows
        site = f"model.layers.{i}.mlp.gate"
        var = ds[f"{site}@output"]
        assert roles_of(var) == ("batch", "token", "expert"), var.dims
        assert var.attrs["layer"] == i
        np.testing.assert_array_equal(var.values, logits.view(batch, length, EXPERTS).numpy())
        np.testing.assert_array_equal(ds[f"root@output.router_logits.{i}"].values,
                                      out.router_logits[i].view(batch, length, -1).numpy())
        for part, value in ((1, weights), (2, chosen)):
            var = ds[f"{site}@output.{part}"]
            assert roles_of(var)[:2] == ("batch", "token"), var.dims
            assert roles_of(var)[2] not in ("expert", "hidden", "neuron"), var.dims
            np.testing.assert_array_equal(var.values, value.view(batch, length, TOP_K).numpy())

        var = ds[f"model.layers.{i}.mlp.experts@output"]
        assert roles_of(var) == ("batch", "token", "hidden"), var.dims
        np.testing.assert_array_equal(var.values, mixed[i].view(batch, length, -1).numpy())

    skipped = ds.attrs.get("skipped", {})
    if family == "qwen2_moe" and length > 1:
        # inside the shared expert: (batch·token, neuron) rows, no batch axis: said why
        inner = "model.layers.0.mlp.shared_expert.up_proj@output"
        assert inner not in ds.data_vars
        assert "no leading batch axis" in skipped[inner], skipped
    np.testing.assert_array_equal(ds["root@output.logits"].values, out.logits.numpy())
