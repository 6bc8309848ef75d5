"""BERT under eager attention and SDPA: its probabilities equal the eager model's own, at
batch 1 and with padding at batch 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

import layerscope

from ._zoo import assert_is_attention, assert_no_image_roles, attention_variables


def _model(implementation: str) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attn_implementation=implementation)
    return BertModel(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bert_attention_equals_the_models_own(tmp_path, batch, implementation):
    model = _model(implementation)
    assert model.config._attn_implementation == implementation
    ids = torch.randint(3, 64, (batch, 6), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, 6, dtype=torch.long)
    if batch > 1:
        mask[2, 4:] = 0
    with torch.no_grad():
        reference = _model("eager")(input_ids=ids, attention_mask=mask, output_attentions=True)
    path = tmp_path / "bert.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    ds = layerscope.open_trace(path)

    expected = {f"encoder.layer.{i}.attention.self@attention": reference.attentions[i]
                for i in range(2)}
    stored = attention_variables(ds)
    assert set(stored) == set(expected)
    for name, reference in expected.items():
        assert_is_attention(stored[name], reference, name)
    np.testing.assert_array_equal(ds["root@output.last_hidden_state"].values,
                                  out.last_hidden_state.numpy())
    assert_no_image_roles(ds)
