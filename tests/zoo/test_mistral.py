"""Mistral: a sliding window of 3 over 7 tokens, grouped-query attention, under eager
attention and SDPA at batch 1 and 3: keys 3 or more positions back hold zero."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from ._causal_lm import IMPLEMENTATIONS, LENGTH, check_causal_lm

WINDOW = 3


def build(implementation: str) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=72, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=WINDOW, attn_implementation=implementation)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_mistral_sliding_window(tmp_path, batch, implementation):
    assert WINDOW < LENGTH
    check_causal_lm(tmp_path, build, batch, implementation, window=WINDOW)
