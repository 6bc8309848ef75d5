"""Qwen2: sliding-window attention in every layer (window 3 over 7 tokens) and grouped-query
attention, under eager attention and SDPA at batch 1 and 3."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ._causal_lm import IMPLEMENTATIONS, LENGTH, check_causal_lm

WINDOW = 3


def build(implementation: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=88, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         sliding_window=WINDOW, use_sliding_window=True, max_window_layers=0,
                         attn_implementation=implementation)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_qwen2_sliding_window(tmp_path, batch, implementation):
    assert WINDOW < LENGTH
    assert build("eager").config.layer_types == ["sliding_attention"] * 2
    check_causal_lm(tmp_path, build, batch, implementation, window=WINDOW)
