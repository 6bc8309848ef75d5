"""Mamba (transformers' slow path: no fused kernels needed): a state-space model has no
attention map; every block's output is (batch, token, hidden), the projections
(batch, token, neuron), the logits (batch, token, <vocabulary>), each equal to the layer's own
output, at batch 1 and 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

import layerscope
from layerscope.backends._attention import is_attention_module
from layerscope.core.naming import roles_of

from ._zoo import assert_no_image_roles, attention_variables

LAYERS, WIDTH, VOCAB, LENGTH = 2, 32, 64, 7


@pytest.mark.parametrize("batch", [1, 3])
def test_mamba(tmp_path, batch):
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=WIDTH, state_size=8,
                         num_hidden_layers=LAYERS, expand=2, conv_kernel=4)
    model = MambaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(batch))
    own: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(
        lambda m, a, o, name=name: own.setdefault(name, o.detach().clone()))
        for name, module in model.named_modules()
        if name.startswith("backbone.") and name.count(".") <= 4 and name != "backbone.layers"]
    path = tmp_path / "mamba.zarr"
    try:
        with layerscope.trace(model, path), torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    ds = layerscope.open_trace(path)

    assert not any(is_attention_module(m) for m in model.modules())
    assert not attention_variables(ds)
    # embeddings and norm_f; per block: itself, its norm, mixer, in_proj, x_proj and out_proj
    assert len(own) == 2 + LAYERS * 6
    for site, value in own.items():
        var = ds[f"{site}@output"]
        feature = "hidden" if value.shape[-1] == WIDTH else "neuron"
        assert roles_of(var) == ("batch", "token", feature), (site, roles_of(var))
        np.testing.assert_array_equal(var.values, value.numpy(), err_msg=site)
    for i, value in enumerate(out.hidden_states):
        var = ds[f"root@output.hidden_states.{i}"]
        assert roles_of(var) == ("batch", "token", "hidden")
        np.testing.assert_array_equal(var.values, value.numpy())
    np.testing.assert_array_equal(ds["backbone.norm_f@output"].values, out.hidden_states[-1])
    for name in ("lm_head@output", "root@output.logits"):
        var = ds[name]
        roles = roles_of(var)
        assert roles[:2] == ("batch", "token") and roles[2] not in ("hidden", "neuron"), \
            (name, roles)
        np.testing.assert_array_equal(var.values, out.logits.numpy(), err_msg=name)
    assert_no_image_roles(ds)
