"""all-MiniLM-L6-v2 (packaged weights): what layerscope stores equals what the model returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import layerscope

from ..conftest import TEXTS, load_minilm

BATCH = 2  # TEXTS makes three appended batches


def reference(model, tokenizer, texts, length):
    encoded = tokenizer(texts, padding="max_length", max_length=length, return_tensors="pt")
    with torch.no_grad():
        return model(**encoded, output_attentions=model.config._attn_implementation == "eager",
                     output_hidden_states=True), encoded


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def traced(request, minilm_folder, minilm_tokenizer, tmp_path_factory):
    model = load_minilm(minilm_folder, request.param)
    path = tmp_path_factory.mktemp(request.param) / "minilm.zarr"
    ds = layerscope.capture(model, TEXTS, path, ["embeddings", "encoder.layer.*"],
                            tokenizer=minilm_tokenizer, batch_size=BATCH)
    return request.param, model, ds


def batches(ds):
    for start in range(0, len(TEXTS), BATCH):
        yield start, TEXTS[start:start + BATCH]


def test_hidden_states_equal_output_hidden_states_bit_for_bit(traced, minilm_tokenizer):
    _, model, ds = traced
    assert ds.attrs["committed_batches"] == 3
    length = ds.sizes["token"]
    for start, texts in batches(ds):
        out, _ = reference(model, minilm_tokenizer, texts, length)
        rows = slice(start, start + len(texts))
        np.testing.assert_array_equal(ds["embeddings@output"].isel(batch=rows).values,
                                      out.hidden_states[0].numpy())
        for layer in range(6):
            np.testing.assert_array_equal(
                ds[f"encoder.layer.{layer}@output"].isel(batch=rows).values,
                out.hidden_states[layer + 1].numpy(), err_msg=f"layer {layer}")


def eager_probabilities(folder, hidden_in, mask, layer):
    """Eager attention of one layer on exactly the inputs the traced run gave it."""
    eager = eager_probabilities.model = getattr(eager_probabilities, "model", None) or \
        load_minilm(folder, "eager")
    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        _, weights = eager.encoder.layer[layer].attention.self(hidden_in, attention_mask=extended)
    return weights.numpy()


def test_attention_probabilities(traced, minilm_folder, minilm_tokenizer):
    implementation, model, ds = traced
    length = ds.sizes["token"]
    for start, texts in batches(ds):
        out, encoded = reference(model, minilm_tokenizer, texts, length)
        rows = slice(start, start + len(texts))
        for layer in range(6):
            stored = ds[f"encoder.layer.{layer}.attention.self@attention"].isel(batch=rows).values
            assert stored.shape == (len(texts), 12, length, length)
            if implementation == "eager":  # returned by the model: stored bit for bit
                np.testing.assert_array_equal(stored, out.attentions[layer].numpy())
            else:  # recomputed from the query and key handed to the fused kernel
                expected = eager_probabilities(minilm_folder, out.hidden_states[layer],
                                               encoded["attention_mask"], layer)
                np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-6)


def test_labels_and_layout(traced, minilm_tokenizer):
    _, _, ds = traced
    attention = ds["encoder.layer.3.attention.self@attention"]
    assert attention.dims == ("batch", "head", "query", "key")
    assert attention.attrs["layer"] == 3 and attention.attrs["kind"] == "attention"
    assert attention.attrs["module_type"] == "BertSelfAttention"
    assert ds["encoder.layer.3@output"].dims == ("batch", "token", "hidden")
    assert ds["encoder.layer.3.intermediate@output"].dims == ("batch", "token", "neuron")
    assert list(ds["input_text"].values) == TEXTS
    ids = minilm_tokenizer(TEXTS[0])["input_ids"]
    assert ds["token_id"].values[0, :len(ids)].tolist() == ids
    assert ds["token_text"].values[0, :len(ids)].tolist() == \
        minilm_tokenizer.convert_ids_to_tokens(ids)
    # no duplicate: the outer attention module hands back the same weights
    assert "encoder.layer.3.attention@output.1" not in ds
    assert ds.attrs["model"]["class"].endswith("BertModel")
    names = layerscope.captured_names(ds)
    assert names.index("encoder.layer.0@output") < names.index("encoder.layer.1@output")
