"""The format's vocabulary for encoder-decoder models: decoder-side axes, the stack, the layer
within it, self vs cross attention, and the decoder's token labels."""

from __future__ import annotations

import numpy as np

import layerscope
from layerscope.core.naming import (
    decoder_side,
    plain_role,
    roles_of,
    stack_of,
    token_axis_of,
)

from .test_skipped_and_warnings import make_recorder


def test_vocabulary_helpers():
    assert stack_of("decoder.block.1.layer.1.EncDecAttention") == "decoder"
    assert stack_of("model.encoder.layers.0.self_attn") == "encoder"
    assert stack_of("transformer.h.0.attn") is None
    assert stack_of("model.decoder_head") is None  # only a whole segment names a stack
    assert decoder_side(("batch", "token", "hidden")) == ("batch", "decoder_token", "hidden")
    assert plain_role("decoder_query") == "query" and plain_role("decoder_x") == "decoder_x"
    assert token_axis_of("decoder_query_5") == "decoder_token"
    assert token_axis_of("key") == "token" and token_axis_of("token_12") == "token"
    assert token_axis_of("hidden") is None


def test_a_seq2seq_pass_is_stored_with_both_token_axes(tmp_path):
    path = tmp_path / "s2s.zarr"
    recorder = make_recorder(path)
    recorder.decode_tokens = lambda ids: [f"t{i}" for i in ids]
    recorder.encoder_decoder = True
    batch, source, target = 2, 7, 5
    recorder.begin_pass(batch, token_ids=np.arange(batch * source).reshape(batch, source),
                        decoder_token_ids=np.arange(batch * target).reshape(batch, target))
    encoder = np.random.default_rng(0).random((batch, source, 4), dtype=np.float32)
    decoder = np.random.default_rng(1).random((batch, target, 4), dtype=np.float32)
    cross = np.random.default_rng(2).random((batch, 2, target, source), dtype=np.float32)
    recorder.put("encoder.block.0", "output", encoder, ("batch", "token", "hidden"))
    recorder.put("decoder.block.1", "output", decoder, decoder_side(("batch", "token", "hidden")))
    recorder.put("decoder.block.1.cross", "attention", cross,
                 ("batch", "head", "decoder_query", "key"), attrs={"attention": "cross"})
    recorder.end_pass()
    recorder.close()

    ds = layerscope.open_trace(path)
    dec = ds["decoder.block.1@output"]
    assert dec.dims == ("batch", "decoder_token", "hidden")
    assert roles_of(dec) == ("batch", "token", "hidden")
    assert dec.attrs["stack"] == "decoder" and dec.attrs["layer"] == 1
    assert ds["encoder.block.0@output"].attrs["stack"] == "encoder"
    attn = ds["decoder.block.1.cross@attention"]
    assert attn.dims == ("batch", "head", "decoder_query", "key")
    assert roles_of(attn) == ("batch", "head", "query", "key")
    assert attn.attrs["attention"] == "cross"
    np.testing.assert_array_equal(attn.values, cross)
    np.testing.assert_array_equal(dec.values, decoder)
    assert ds["decoder_token_id"].dims == ("batch", "decoder_token")
    assert ds["decoder_token_text"].values[1, 0] == "t5"
    assert ds["token_text"].values[1, 0] == "t7"
    assert list(ds["decoder_token"].values) == list(range(target))
    assert "decoder_token_text" in ds.coords


def test_only_an_encoder_decoder_model_records_stacks(tmp_path):
    """A module called ``decoder`` in another model (a word language model's output layer)
    is no stack."""
    path = tmp_path / "lm.zarr"
    recorder = make_recorder(path)
    recorder.begin_pass(1)
    recorder.put("decoder", "output", np.zeros((1, 3, 4), np.float32), ("batch", "token", "axis2"))
    recorder.end_pass()
    recorder.close()
    assert "stack" not in layerscope.open_trace(path)["decoder@output"].attrs
