"""T5 under eager attention: the relative position bias that T5Attention returns beside its
probabilities, (1, head, query, key) like an attention map at batch 1, is never stored as
attention, and no T5 tensor is labeled as an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

import layerscope
from layerscope.core.naming import parse_variable_name, roles_of

from ._seq2seq import Sites, assert_encoder_decoder_trace, run_reference, trace
from ._zoo import assert_is_attention, assert_no_image_roles, attention_variables, captures

LAYERS = 2


def _config() -> T5Config:
    return T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
                    num_decoder_layers=LAYERS, num_heads=4, decoder_start_token_id=0,
                    attn_implementation="eager")


def _inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 2:] = 0  # one padded sample: masked keys carry no probability
    return ids, mask


def _position_bias(model: torch.nn.Module, stack: str, query: int, key: int) -> np.ndarray:
    attention = getattr(model, stack).block[0].layer[0].SelfAttention
    with torch.no_grad():
        return attention.compute_bias(query, key).numpy()


def _assert_bias_is_not_attention(ds, bias: np.ndarray) -> None:
    """Where the bias is stored (an output at batch 1), it has neutral dims, not attention's."""
    found = 0
    for name, var in captures(ds).items():
        if var.shape != bias.shape:
            continue
        if np.allclose(var.values, bias, rtol=0, atol=1e-6):
            found += 1
            assert not parse_variable_name(name).kind.startswith("attention"), name
            assert "query" not in roles_of(var) and "channel" not in roles_of(var), name
    if bias.shape[0] == ds.sizes["batch"]:
        assert found, "the position bias of batch 1 should be stored, as a plain output"


@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_attention_is_the_softmax_not_the_position_bias(tmp_path, batch):
    torch.manual_seed(0)
    model = T5EncoderModel(_config()).eval()
    ids, mask = _inputs(batch, 7, seed=batch)
    path = tmp_path / "t5-encoder.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    ds = layerscope.open_trace(path)

    stored = attention_variables(ds)
    expected = {f"encoder.block.{i}.layer.0.SelfAttention@attention": out.attentions[i]
                for i in range(LAYERS)}
    assert set(stored) == set(expected)
    for name, reference in expected.items():
        assert_is_attention(stored[name], reference, name)
    np.testing.assert_array_equal(ds["root@output.last_hidden_state"].values,
                                  out.last_hidden_state.numpy())
    _assert_bias_is_not_attention(ds, _position_bias(model, "encoder", 7, 7))
    assert_no_image_roles(ds)


@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_decoder_self_and_cross_attention(tmp_path, batch):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(_config()).eval()
    ids, mask = _inputs(batch, 7, seed=batch)
    decoder_ids = torch.randint(3, 64, (batch, 5), generator=torch.Generator().manual_seed(9))
    path = tmp_path / "t5.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                    output_attentions=True)
    ds = layerscope.open_trace(path)

    expected = {}
    for i in range(LAYERS):
        expected[f"encoder.block.{i}.layer.0.SelfAttention@attention"] = out.encoder_attentions[i]
        expected[f"decoder.block.{i}.layer.0.SelfAttention@attention"] = out.decoder_attentions[i]
        expected[f"decoder.block.{i}.layer.1.EncDecAttention@attention"] = out.cross_attentions[i]
    stored = attention_variables(ds)
    assert set(stored) == set(expected)
    for name, reference in expected.items():
        assert_is_attention(stored[name], reference, name)
    np.testing.assert_array_equal(ds["root@output.logits"].values, out.logits.numpy())
    _assert_bias_is_not_attention(ds, _position_bias(model, "encoder", 7, 7))
    _assert_bias_is_not_attention(ds, _position_bias(model, "decoder", 5, 5))
    assert_no_image_roles(ds)


def test_bias_returned_alone_in_attention_shape_is_not_attention(tmp_path):
    """An attention module returning, besides its output, a tensor shaped like an attention
    map that no softmax produced: stored as an output with neutral dims."""

    class BiasOnlyAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.rand(1, 2, 4, 4))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, self.bias.expand(x.shape[0], -1, -1, -1)

    model = BiasOnlyAttention()
    path = tmp_path / "bias.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(torch.rand(1, 4, 8))
    ds = layerscope.open_trace(path)
    assert not attention_variables(ds)
    assert roles_of(ds["root@output.1"]) == ("batch", "axis1", "axis2", "axis3")


SITES = Sites(
    encoder_self="encoder.block.{i}.layer.0.SelfAttention",
    decoder_self="decoder.block.{i}.layer.0.SelfAttention",
    cross="decoder.block.{i}.layer.1.EncDecAttention",
    encoder_layer="encoder.block.{i}",
    decoder_layer="decoder.block.{i}",
    cross_key_value=("decoder.block.{i}.layer.1.EncDecAttention.k",
                     "decoder.block.{i}.layer.1.EncDecAttention.v"),
)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_decoder_axes_by_stack(tmp_path, monkeypatch, batch, implementation):
    """Self and cross attention named and marked by stack, held to the model's own maps under
    eager attention and recomputed under SDPA; a source and a target of different lengths."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(_config()).eval()
    ids, mask = _inputs(batch, 7, seed=batch)
    decoder_ids = torch.randint(3, 64, (batch, 5), generator=torch.Generator().manual_seed(9))
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    reference = run_reference(model, inputs)

    ds, out, fused = trace(model, inputs, tmp_path / "t5.zarr", implementation, monkeypatch)
    assert fused == (3 * LAYERS if implementation == "sdpa" else 0)
    assert_encoder_decoder_trace(ds, out, reference, SITES, LAYERS, source=7, target=5,
                                 exact=implementation == "eager", token_ids=ids,
                                 decoder_token_ids=decoder_ids)


def test_decoder_ids_the_model_builds_from_labels(tmp_path):
    """Called with ``labels`` alone, T5 shifts them right into its decoder's input: those ids
    label the decoder's positions."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(_config()).eval()
    ids, mask = _inputs(3, 7, seed=3)
    labels = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(9))
    seen: list[torch.Tensor] = []
    handle = model.decoder.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"].clone()), with_kwargs=True)
    path = tmp_path / "t5-labels.zarr"
    try:
        with layerscope.trace(model, path), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        handle.remove()
    ds = layerscope.open_trace(path)
    assert len(seen) == 1 and not torch.equal(seen[0], labels)
    np.testing.assert_array_equal(ds["decoder_token_id"].values, seen[0].numpy())
    np.testing.assert_array_equal(ds["token_id"].values, ids.numpy())
    assert ds["decoder.block.0@output"].dims == ("batch", "decoder_token", "hidden")
