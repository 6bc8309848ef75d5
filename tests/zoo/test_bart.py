"""BART: encoder self-attention, decoder self-attention and cross-attention under eager and SDPA
attention, each held to the model's own maps, with the decoder's axes named as the decoder's."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from ._seq2seq import BART_STYLE_SITES, assert_encoder_decoder_trace, run_reference, trace

LAYERS = 2
SOURCE, TARGET = 7, 5
SITES = BART_STYLE_SITES


def _model() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_position_embeddings=32)
    return BartForConditionalGeneration(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bart_attentions_and_states_by_stack(tmp_path, monkeypatch, batch, implementation):
    model = _model()
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 64, (batch, SOURCE), generator=generator)
    mask = torch.ones(batch, SOURCE, dtype=torch.long)
    if batch > 1:
        mask[1, SOURCE - 2:] = 0  # a padded source: its keys get no probability
    decoder_ids = torch.randint(3, 64, (batch, TARGET), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    reference = run_reference(model, inputs)

    ds, out, fused = trace(model, inputs, tmp_path / "bart.zarr", implementation, monkeypatch)
    assert fused == (3 * LAYERS if implementation == "sdpa" else 0)
    assert_encoder_decoder_trace(ds, out, reference, SITES, LAYERS, source=SOURCE, target=TARGET,
                                 exact=implementation == "eager", token_ids=ids,
                                 decoder_token_ids=decoder_ids)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-5)


def test_decoder_ids_the_model_builds_label_the_decoder_tokens(tmp_path):
    """Without decoder_input_ids, BART builds them from input_ids (shifted right): the ids its
    decoder reads label the decoder's positions."""
    import numpy as np
    from transformers.models.bart.modeling_bart import shift_tokens_right

    import layerscope

    model = _model()
    ids = torch.randint(3, 64, (2, SOURCE), generator=torch.Generator().manual_seed(5))
    path = tmp_path / "bart-built.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(input_ids=ids)
    ds = layerscope.open_trace(path)
    built = shift_tokens_right(ids, model.config.pad_token_id,
                               model.config.decoder_start_token_id)
    np.testing.assert_array_equal(ds["decoder_token_id"].values, built.numpy())
    assert ds["decoder_token_id"].dims == ("batch", "decoder_token")
    assert ds["model.decoder.layers.0@output"].dims[:2] == ("batch", "decoder_token")
