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


def test_decoder_ids_built_from_labels_label_the_decoder_tokens(tmp_path):
    """Given only labels, Whisper shifts them right behind its start token: the ids its
    decoder reads label the decoder's positions."""
    import layerscope

    model = _model()
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, MELS, FRAMES, generator=generator)
    labels = torch.randint(3, 64, (2, TARGET), generator=generator)
    path = tmp_path / "whisper-labels.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(input_features=features, labels=labels)
    ds = layerscope.open_trace(path)
    expected = torch.cat([torch.full((2, 1), model.config.decoder_start_token_id), labels[:, :-1]],
                         dim=1)
    np.testing.assert_array_equal(ds["decoder_token_id"].values, expected.numpy())
    assert roles_of(ds["decoder_token_id"]) == ("batch", "token")
    assert ds["decoder_token_id"].dims == ("batch", "decoder_token")
