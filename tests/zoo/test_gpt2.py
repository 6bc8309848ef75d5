"""GPT-2: its Conv1D layers are linear layers, so their outputs are (batch, token, feature),
never a channels-first map; real convolutions still are (batch, channel, width). Its maps,
under eager attention and SDPA, equal the eager model's own; the logits' last axis (the
vocabulary, tied to the token embedding) is no feature axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import layerscope
from layerscope.core.naming import roles_of

from ._zoo import assert_is_attention, assert_no_image_roles, attention_variables, captures

LAYERS = 2
LINEAR = ("c_fc", "c_proj", "c_attn")


def _model(implementation: str = "eager") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=64, bos_token_id=1,
                        eos_token_id=2, attn_implementation=implementation)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv1d_layers_are_token_by_feature(tmp_path, batch, implementation):
    model = _model(implementation)
    assert model.config._attn_implementation == implementation
    ids = torch.randint(3, 64, (batch, 6), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        reference = _model("eager")(input_ids=ids, output_attentions=True)
    own: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda m, a, o, name=name: own.setdefault(name, o.detach().clone()))
        for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in LINEAR
    ]
    path = tmp_path / "gpt2.zarr"
    try:
        with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    ds = layerscope.open_trace(path)

    assert len(own) == LAYERS * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block
    for site, value in own.items():
        var = ds[f"{site}@output"]
        roles = roles_of(var)
        assert roles[:2] == ("batch", "token"), (site, roles)
        assert roles[2] == ("hidden" if value.shape[-1] == 32 else "neuron"), (site, roles)
        np.testing.assert_array_equal(var.values, value.numpy(), err_msg=site)
    assert roles_of(ds["transformer.h.0.mlp.c_fc@output"]) == ("batch", "token", "neuron")
    for i in range(LAYERS - 1):  # the last block's output is taken before ln_f
        var = ds[f"transformer.h.{i}@output"]
        assert roles_of(var) == ("batch", "token", "hidden")
        np.testing.assert_array_equal(var.values, out.hidden_states[i + 1].numpy())

    expected = {f"transformer.h.{i}.attn@attention": reference.attentions[i]
                for i in range(LAYERS)}
    stored = attention_variables(ds)
    assert set(stored) == set(expected)
    for name, probabilities in expected.items():
        assert_is_attention(stored[name], probabilities, name)
    for name in ("lm_head@output", "root@output.logits"):
        roles = roles_of(ds[name])
        assert roles[:2] == ("batch", "token") and roles[2] not in ("hidden", "neuron"), roles
        np.testing.assert_array_equal(ds[name].values, out.logits.numpy(), err_msg=name)
    assert_no_image_roles(ds)


class Signal(nn.Module):
    """A real 1-d convolution stack beside a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.MaxPool1d(2),
                                      nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(-1))


@pytest.mark.parametrize("batch", [1, 3])
def test_real_convolutions_are_channels_first(tmp_path, batch):
    torch.manual_seed(0)
    model = Signal().eval()
    x = torch.randn(batch, 2, 12)
    path = tmp_path / "signal.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(x)
    ds = layerscope.open_trace(path)
    signal = ("batch", "channel", "width")
    for site in ("features.0", "features.1", "features.2", "features.3", "features"):
        assert roles_of(ds[f"{site}@output"]) == signal, site
    assert roles_of(ds["head@output"]) == ("batch", "hidden")
    with torch.no_grad():
        np.testing.assert_array_equal(ds["features@output"].values, model.features(x).numpy())


def test_a_four_d_tensor_of_an_unknown_module_is_not_an_image(tmp_path):
    """Rank alone says nothing: a 4-d tensor no channels-first module produced is neutral."""

    class Heads(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], 5, 2, 4).transpose(1, 2)

    model = Heads()
    path = tmp_path / "heads.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(torch.rand(3, 5, 8))
    roles = roles_of(layerscope.open_trace(path)["root@output"])
    assert roles == ("batch", "axis1", "axis2", "axis3")


def test_conv1d_named_class_that_is_linear_by_its_fields(tmp_path):
    """A Conv1D-style layer outside transformers (weight (in, out), ``nf`` out features) is a
    linear layer: token axis first, features last, even on a 4-d input."""

    class Conv1D(nn.Module):
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    model = Conv1D(6, 4)
    path = tmp_path / "conv1d.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(torch.rand(2, 3, 5, 4))
    ds = layerscope.open_trace(path)
    assert roles_of(ds["root@output"]) == ("batch", "axis1", "axis2", "hidden")
    assert not any("channel" in roles_of(var) for var in captures(ds).values())
