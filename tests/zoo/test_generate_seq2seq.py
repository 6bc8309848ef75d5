"""``generate()`` of encoder-decoder models (BART, T5) inside a trace: the encoder's pass once
on ``token``, the decoder's steps assembled on ``decoder_token``: its self-attention as the full
causal map, its cross-attention one row per step over the encoder's positions. All of it equal
to one eager forward pass over the prompt and the generated sequences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import layerscope
from layerscope.core.naming import roles_of

from ._seq2seq import BART_STYLE_SITES, CROSS, DECODER_SELF, ENCODER_SELF, Sites
from .test_t5 import SITES as T5_SITES

SOURCE = 6
NEW_TOKENS = 4
LAYERS = 2
ATOL = 1e-5


def _bart(implementation: str) -> nn.Module:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, max_position_embeddings=32, attn_implementation=implementation,
    )).eval()


def _t5(implementation: str) -> nn.Module:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
        num_heads=4, decoder_start_token_id=0, attn_implementation=implementation,
    )).eval()


FAMILIES: dict[str, tuple[Callable[[str], nn.Module], Sites]] = {
    "bart": (_bart, BART_STYLE_SITES), "t5": (_t5, T5_SITES),
}


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_seq2seq_generate_equals_one_pass(tmp_path, name, implementation, sampled):
    build, sites = FAMILIES[name]
    model = build(implementation)
    ids = torch.randint(3, 64, (3, SOURCE), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, SOURCE - 2:] = 0  # a padded source: its keys carry no probability

    def generate() -> torch.Tensor:
        torch.manual_seed(11)
        with torch.no_grad():  # min_new_tokens: the end-of-sequence token is not drawn early
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=sampled,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    untraced = generate()
    path = tmp_path / "seq2seq.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]):
        sequences = generate()
    np.testing.assert_array_equal(sequences.numpy(), untraced.numpy())
    with torch.no_grad():
        reference = build("eager")(input_ids=ids, attention_mask=mask,
                                   decoder_input_ids=sequences, output_attentions=True,
                                   output_hidden_states=True)
    ds = layerscope.open_trace(path)

    length = sequences.shape[1]
    fed = length - 1  # the last generated token is never fed back
    assert ds.sizes["token"] == SOURCE and ds.sizes["decoder_token"] == length
    np.testing.assert_array_equal(ds["token_id"].values, ids.numpy())
    np.testing.assert_array_equal(ds["token_mask"].values, mask.numpy().astype(bool))
    np.testing.assert_array_equal(ds["decoder_token_id"].values, sequences.numpy())
    np.testing.assert_array_equal(ds["decoder_token_step"].values[0], np.arange(length))
    assert ds["decoder_token_mask"].values.all()
    source_rows = mask.numpy().astype(bool)

    for i in range(LAYERS):
        encoder = ds[f"{sites.encoder_self.format(i=i)}@attention"]
        assert roles_of(encoder) == ENCODER_SELF and encoder.dims == ENCODER_SELF
        rows = np.broadcast_to(source_rows[:, None], encoder.shape[:-1])
        np.testing.assert_allclose(encoder.values[rows],
                                   reference.encoder_attentions[i].numpy()[rows],
                                   rtol=0, atol=ATOL, err_msg=f"encoder {i}")
        for site, dims, expected in (
                (sites.decoder_self, DECODER_SELF, reference.decoder_attentions[i]),
                (sites.cross, CROSS, reference.cross_attentions[i])):
            var = ds[f"{site.format(i=i)}@attention"]
            assert var.dims == dims, (site, var.dims)
            np.testing.assert_allclose(var.values[:, :, :fed], expected.numpy()[:, :, :fed],
                                       rtol=0, atol=ATOL, err_msg=site.format(i=i))
            assert np.isnan(var.values[:, :, fed:]).all()
        for site in sites.cross_key_value:  # computed once, over the encoder's positions
            assert ds[f"{site.format(i=i)}@output"].dims == ("batch", "token", "hidden")

    for i in range(LAYERS - 1):  # the last layer's output is taken before the final norm
        encoder = ds[f"{sites.encoder_layer.format(i=i)}@output"].values
        np.testing.assert_allclose(encoder[source_rows],
                                   reference.encoder_hidden_states[i + 1].numpy()[source_rows],
                                   rtol=0, atol=ATOL)
        decoder = ds[f"{sites.decoder_layer.format(i=i)}@output"]
        assert decoder.dims == ("batch", "decoder_token", "hidden")
        np.testing.assert_allclose(decoder.values[:, :fed],
                                   reference.decoder_hidden_states[i + 1].numpy()[:, :fed],
                                   rtol=0, atol=ATOL)
    logits = ds["root@output.logits"]
    assert logits.dims[:2] == ("batch", "decoder_token")
    np.testing.assert_allclose(logits.values[:, :fed], reference.logits.numpy()[:, :fed],
                               rtol=0, atol=ATOL)
