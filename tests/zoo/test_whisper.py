"""Whisper: an audio encoder (a convolution front-end over mel features, then attention over
frames) and a text decoder; every attention map held to the model's own under eager and SDPA
attention, the convolutions labeled as signals, never as tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from layerscope.core.naming import roles_of

from ._seq2seq import BART_STYLE_SITES, assert_encoder_decoder_trace, run_reference, trace

LAYERS = 2
MELS, FRAMES = 8, 16  # the encoder sees FRAMES // 2 positions after its strided convolution
SOURCE, TARGET = FRAMES // 2, 5
SITES = BART_STYLE_SITES


def _model() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=LAYERS,
                           decoder_layers=LAYERS, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                           num_mel_bins=MELS, max_source_positions=SOURCE,
                           max_target_positions=32, pad_token_id=1, bos_token_id=2,
                           eos_token_id=2, decoder_start_token_id=2)
    return WhisperForConditionalGeneration(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_whisper_attentions_and_states_by_stack(tmp_path, monkeypatch, batch, implementation):
    model = _model()
    generator = torch.Generator().manual_seed(batch)
    features = torch.randn(batch, MELS, FRAMES, generator=generator)
    decoder_ids = torch.randint(3, 64, (batch, TARGET), generator=generator)
    inputs = {"input_features": features, "decoder_input_ids": decoder_ids}
    reference = run_reference(model, inputs)

    ds, out, fused = trace(model, inputs, tmp_path / "whisper.zarr", implementation, monkeypatch)
    assert fused == (3 * LAYERS if implementation == "sdpa" else 0)
    assert_encoder_decoder_trace(ds, out, reference, SITES, LAYERS, source=SOURCE,
                                 target=TARGET, exact=implementation == "eager",
                                 decoder_token_ids=decoder_ids)

    # the convolution front-end: (batch, channel, width), the model's own values
    encoder = model.model.encoder
    with torch.no_grad():
        first = encoder.conv1(features)
        own = {"conv1": first, "conv2": encoder.conv2(torch.nn.functional.gelu(first))}
    for site, value in own.items():
        var = ds[f"model.encoder.{site}@output"]
        assert roles_of(var) == ("batch", "channel", "width"), (site, var.dims)
        assert var.attrs["stack"] == "encoder"
        np.testing.assert_array_equal(var.values, value.numpy(), err_msg=site)
