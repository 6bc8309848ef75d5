"""ResNet: every map is (batch, channel, height, width), from the stem through each stage to
the pooled 1x1 map, each equal to the layer's own output, at batch 1 and 3; the classifier's
logits are no feature axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import captures

CNN = ("batch", "channel", "height", "width")


def build() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=5)
    return ResNetForImageClassification(config).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_resnet_maps_are_channels_first_all_the_way(tmp_path, batch):
    model = build()
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    own: dict[str, torch.Tensor] = {}

    def keep(name: str, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            own[name] = output.detach().clone()

    handles = [module.register_forward_hook(lambda m, a, o, name=name: keep(name, o))
               for name, module in model.named_modules() if name]
    path = tmp_path / "resnet.zarr"
    try:
        with layerscope.trace(model, path), torch.no_grad():
            out = model(pixels, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    ds = layerscope.open_trace(path)

    assert len(own) > 20  # every conv, norm, activation, block, stage and the pooler
    for site, value in own.items():
        var = ds[f"{site}@output"]
        assert roles_of(var) == CNN, (site, roles_of(var))
        np.testing.assert_array_equal(var.values, value.numpy(), err_msg=site)
    pooled = ds["resnet.pooler@output"]
    assert pooled.shape == (batch, 16, 1, 1) and roles_of(pooled) == CNN
    np.testing.assert_array_equal(pooled.values, own["resnet.pooler"].numpy())
    np.testing.assert_allclose(pooled.values[..., 0, 0], out.hidden_states[-1].mean((2, 3)).numpy(),
                               rtol=0, atol=1e-6)  # the mean over the last stage's map
    for name in ("resnet@output.last_hidden_state", "resnet@output.pooler_output",
                 "resnet.encoder@output.last_hidden_state"):
        assert roles_of(ds[name]) == CNN, name
    sites = ["resnet.embedder", "resnet.encoder.stages.0", "resnet.encoder.stages.1"]
    for site, value in zip(sites, out.hidden_states, strict=True):
        np.testing.assert_array_equal(ds[f"{site}@output"].values, value.numpy(), err_msg=site)
    # no 4-d map anywhere is labeled otherwise
    wrong = {n: roles_of(v) for n, v in captures(ds).items() if v.ndim == 4 and roles_of(v) != CNN}
    assert not wrong, wrong

    for name in ("classifier.1@output", "classifier@output", "root@output.logits"):
        var = ds[name]
        assert var.shape == (batch, 5) and roles_of(var)[1] not in ("hidden", "neuron"), name
        np.testing.assert_array_equal(var.values, out.logits.numpy(), err_msg=name)
