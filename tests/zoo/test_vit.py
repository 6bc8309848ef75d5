"""ViT: the patch embedding convolution is (batch, channel, height, width), the tokens after it
(batch, token, hidden), every layer's attention map equals the model's own under eager
attention and SDPA, at batch 1 and 3; the classifier's logits are no feature axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import ATTENTION_ROLES, attention_variables

LAYERS = 2
IMAGE, PATCH = 16, 4
TOKENS = (IMAGE // PATCH) ** 2 + 1  # the patches and the class token


def build(implementation: str) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                       intermediate_size=64, image_size=IMAGE, patch_size=PATCH, num_labels=5,
                       attn_implementation=implementation)
    return ViTForImageClassification(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_vit(tmp_path, batch, implementation):
    pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = build("eager")(pixels, output_attentions=True)
    model = build(implementation)
    projection = model.vit.embeddings.patch_embeddings.projection
    own: list[torch.Tensor] = []
    handle = projection.register_forward_hook(lambda m, a, o: own.append(o.clone()))
    path = tmp_path / "vit.zarr"
    try:
        with layerscope.trace(model, path), torch.no_grad():
            out = model(pixels, output_hidden_states=True)
    finally:
        handle.remove()
    ds = layerscope.open_trace(path)

    patches = ds["vit.embeddings.patch_embeddings.projection@output"]
    assert roles_of(patches) == ("batch", "channel", "height", "width")
    assert patches.shape == (batch, 32, IMAGE // PATCH, IMAGE // PATCH)
    np.testing.assert_array_equal(patches.values, own[0].numpy())
    flat = ds["vit.embeddings.patch_embeddings@output"]  # the map flattened into tokens
    assert roles_of(flat) == ("batch", "token", "hidden")
    np.testing.assert_array_equal(flat.values, own[0].flatten(2).transpose(1, 2).numpy())

    sites = ["vit.embeddings", *(f"vit.layers.{i}" for i in range(LAYERS))]
    for site, value in zip(sites, out.hidden_states, strict=True):
        var = ds[f"{site}@output"]
        assert roles_of(var) == ("batch", "token", "hidden"), (site, roles_of(var))
        assert var.shape == (batch, TOKENS, 32)
        np.testing.assert_array_equal(var.values, value.numpy(), err_msg=site)

    maps = attention_variables(ds)
    assert set(maps) == {f"vit.layers.{i}.attention@attention" for i in range(LAYERS)}, maps
    for i in range(LAYERS):
        name = f"vit.layers.{i}.attention@attention"
        var, expected = maps[name], reference.attentions[i].numpy()
        assert roles_of(var) == ATTENTION_ROLES and var.shape == (batch, 4, TOKENS, TOKENS)
        if implementation == "eager":
            np.testing.assert_array_equal(var.values, expected, err_msg=name)
        else:
            np.testing.assert_allclose(var.values, expected, rtol=0, atol=1e-6, err_msg=name)

    for name in ("classifier@output", "root@output.logits"):
        var = ds[name]
        assert roles_of(var)[0] == "batch" and roles_of(var)[1] not in ("hidden", "neuron")
        np.testing.assert_array_equal(var.values, out.logits.numpy(), err_msg=name)
