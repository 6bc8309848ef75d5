"""Encoder-decoder structure in the torch backend without Hugging Face: ``torch.nn.Transformer``
(an ``encoder`` and a ``decoder`` stack of ``nn.MultiheadAttention``), with a source and a
target of the same length, so only structure can tell the decoder's axes from the encoder's;
and what an attention call's arguments say about self and cross attention."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import layerscope
from layerscope.backends._torch_seq2seq import attention_call
from layerscope.core.naming import roles_of


def test_nn_transformer_axes_by_stack_at_equal_lengths(tmp_path):
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                           dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    source, target = torch.randn(3, 6, 16), torch.randn(3, 6, 16)
    path = tmp_path / "transformer.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        out = model(source, target)
    ds = layerscope.open_trace(path)

    for i in range(2):
        site = f"decoder.layers.{i}"
        own = ds[f"{site}.self_attn@attention"]
        assert own.dims == ("batch", "head", "decoder_query", "decoder_key")
        assert (own.attrs["attention"], own.attrs["stack"], own.attrs["layer"]) == \
            ("self", "decoder", i)
        cross = ds[f"{site}.multihead_attn@attention"]
        assert cross.dims == ("batch", "head", "decoder_query", "key")
        assert (cross.attrs["attention"], cross.attrs["stack"]) == ("cross", "decoder")
        assert roles_of(cross) == ("batch", "head", "query", "key")
        np.testing.assert_allclose(cross.values.sum(-1), 1.0, rtol=0, atol=1e-5)
        assert ds[f"{site}@output"].dims == ("batch", "decoder_token", "hidden")
    memory = ds["encoder@output"]
    assert memory.dims == ("batch", "token", "hidden")
    with torch.no_grad():
        np.testing.assert_array_equal(memory.values, model.encoder(source).numpy())
    np.testing.assert_array_equal(ds["root@output"].values, out.numpy())
    assert ds["root@output"].dims == ("batch", "decoder_token", "hidden")


class _Context(nn.Module):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + context.mean(1, keepdim=True)


class _Rotary(nn.Module):
    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = position_embeddings
        return hidden_states * cos + sin


class _Hf(nn.Module):
    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = hidden_states if key_value_states is None else key_value_states
        return hidden_states + attended.mean(1, keepdim=True)


def test_self_or_cross_from_the_arguments_never_the_shapes():
    x, other = torch.rand(2, 4, 8), torch.rand(2, 4, 8)  # same shape: no clue there
    positions = (torch.rand(2, 4, 8), torch.rand(2, 4, 8))
    assert attention_call(_Hf(), (x,), {"key_value_states": other})[0] == "cross"
    assert attention_call(_Hf(), (x,), {"key_value_states": None})[0] == "self"
    assert attention_call(_Hf(), (x, other), {})[0] == "cross"
    assert attention_call(_Rotary(), (x, positions), {"attention_mask": None})[0] == "self"
    assert attention_call(_Context(), (x, other), {})[0] is None  # a second input: unsaid
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    assert attention_call(mha, (x, x, x), {})[0] == "self"
    assert attention_call(mha, (x, other, other), {})[0] == "cross"
    assert attention_call(mha, (x,), {"key": other, "value": other})[0] == "cross"


def test_id_and_mask_inputs_are_token_grids(tmp_path):
    """The 2-d integer ids and masks a call is handed are (batch, token), the decoder's
    (batch, decoder_token); never (batch, feature)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                      num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    ids, decoder_ids = torch.randint(3, 64, (3, 7)), torch.randint(3, 64, (3, 5))
    mask = torch.ones(3, 7, dtype=torch.long)
    path = tmp_path / "inputs.zarr"
    with layerscope.trace(model, path, capture=["root", "encoder", "decoder"],
                          kinds=["input"]), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    ds = layerscope.open_trace(path)
    for name, value, dims in (
            ("root@input.input_ids", ids, ("batch", "token")),
            ("root@input.attention_mask", mask, ("batch", "token")),
            ("root@input.decoder_input_ids", decoder_ids, ("batch", "decoder_token")),
            ("encoder@input.input_ids", ids, ("batch", "token")),
            ("decoder@input.input_ids", decoder_ids, ("batch", "decoder_token"))):
        assert ds[name].dims == dims, (name, ds[name].dims)
        np.testing.assert_array_equal(ds[name].values, value.numpy())


def test_attention_of_encoder_only_and_decoder_only_models_is_self(tmp_path):
    """BERT (its self-attention takes an unused encoder_hidden_states), GPT-2 and Llama (rotary
    position embeddings beside the hidden states): every map is marked self, plain dims."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
    )

    torch.manual_seed(0)
    models = {
        "bert": BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)),
        "gpt2": GPT2Model(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)),
        "llama": LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1)),
    }
    ids = torch.randint(3, 64, (2, 6))
    for name, model in models.items():
        path = tmp_path / f"{name}.zarr"
        with layerscope.trace(model.eval(), path, kinds=["attention"]), torch.no_grad():
            model(input_ids=ids)
        maps = list(layerscope.open_trace(path).data_vars.values())
        maps = [var for var in maps if str(var.name).endswith("@attention")]
        assert len(maps) == 2, name
        for var in maps:
            assert var.attrs["attention"] == "self", (name, var.name)
            assert var.dims == ("batch", "head", "query", "key"), (name, var.dims)


def test_bert_to_bert_decoder_whose_stack_holds_an_encoder_named_module(tmp_path):
    """EncoderDecoderModel with a BERT decoder: the decoder's layers sit under
    ``decoder.bert.encoder``; they are the decoder's, and its cross-attention keys (and key
    and value projections) the encoder's; maps equal the model's own."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    def bert(**extra: object) -> BertConfig:
        return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, **extra)

    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        bert(), bert(is_decoder=True, add_cross_attention=True))
    torch.manual_seed(0)
    model = EncoderDecoderModel(config=config).eval()
    model.set_attn_implementation("eager")  # its maps are the references
    ids, decoder_ids = torch.randint(3, 64, (2, 7)), torch.randint(3, 64, (2, 5))
    path = tmp_path / "bert2bert.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=decoder_ids, output_attentions=True)
    ds = layerscope.open_trace(path)

    layer = "decoder.bert.encoder.layer.0"
    for site, reference, dims, kind in (
            ("encoder.encoder.layer.0.attention.self", out.encoder_attentions[0],
             ("batch", "head", "query", "key"), "self"),
            (f"{layer}.attention.self", out.decoder_attentions[0],
             ("batch", "head", "decoder_query", "decoder_key"), "self"),
            (f"{layer}.crossattention.self", out.cross_attentions[0],
             ("batch", "head", "decoder_query", "key"), "cross")):
        var = ds[f"{site}@attention"]
        assert var.dims == dims and var.attrs["attention"] == kind, (site, var.dims)
        np.testing.assert_array_equal(var.values, reference.numpy())
    assert ds[f"{layer}@output"].attrs["stack"] == "decoder"
    assert ds[f"{layer}@output"].dims == ("batch", "decoder_token", "hidden")
    for projection in ("key", "value"):
        assert ds[f"{layer}.crossattention.self.{projection}@output"].dims == \
            ("batch", "token", "hidden")
    assert ds["root@output.logits"].dims[:2] == ("batch", "decoder_token")
    np.testing.assert_array_equal(ds["decoder_token_id"].values, decoder_ids.numpy())


def test_outside_an_encoder_decoder_only_the_attention_calls_whose_maps_are_stored_are_followed(
        tmp_path):
    """A decoder-only model traced at its outputs has no hook on its attention modules (a
    call's record only labels its map); one traced for one layer's map follows that layer's
    calls alone, and the map is still marked self."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)).eval()
    ids = torch.randint(3, 64, (2, 6))
    attention = {f"h.{i}.attn": model.h[i].attn for i in range(2)}
    for capture, followed in (("h.?@output", set()), ("h.1.attn@attention", {"h.1.attn"})):
        path = tmp_path / f"{len(followed)}.zarr"
        with layerscope.trace(model, path, capture), torch.no_grad():
            hooked = {site for site, module in attention.items() if module._forward_pre_hooks}
            model(input_ids=ids)
        assert hooked == followed, capture
        maps = [var for name, var in layerscope.open_trace(path).data_vars.items()
                if str(name).endswith("@attention")]
        assert [var.attrs["attention"] for var in maps] == ["self"] * len(followed)
