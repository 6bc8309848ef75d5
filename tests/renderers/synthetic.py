"""Traces written straight through core (no framework): exact values chosen by the test."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.core import Recorder, Selection, StoreOptions
from layerscope.core.format import new_group_attrs
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter

Tensor = tuple[str, str, np.ndarray, tuple[str, ...]]


def write_trace(path: Path | str, batches: Iterable[list[Tensor]],
                options: StoreOptions | None = None, tokens: Iterable[Any] | None = None) -> Path:
    """Write one pass per element of ``batches``: (site, kind, array, roles) tuples."""
    attrs = new_group_attrs("numpy", np.__version__, {"class": "synthetic"}, Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    writer = TraceWriter(group, options or StoreOptions(mode="w"))
    recorder = Recorder(writer, Selection(), "numpy",
                        (lambda ids: [f"t{i}" for i in ids]) if tokens is not None else None)
    token_batches = iter(tokens) if tokens is not None else None
    try:
        for tensors in batches:
            size = tensors[0][2].shape[0]
            ids = next(token_batches) if token_batches is not None else None
            recorder.begin_pass(size, ids)
            for site, kind, array, roles in tensors:
                recorder.put(site, kind, array, roles, "Synthetic")
            recorder.end_pass()
    finally:
        recorder.close()
    return Path(path)


ENCODER_TOKENS = 7
DECODER_TOKENS = 5
HEADS = 2


def seq2seq_trace(path: Path | str, batch: int = 2, layers: int = 2) -> Path:
    """An encoder-decoder trace as the format describes it: encoder tokens ``e<i>``, decoder
    tokens ``d<i>``; per layer an encoder self-attention, a decoder self- and cross-attention,
    block outputs and MLP activations in both stacks. Values are random, seeded."""
    from layerscope.core.naming import decoder_side

    attrs = new_group_attrs("numpy", np.__version__, {"class": "seq2seq"}, Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode="w")), Selection(), "numpy",
                        lambda ids: [f"e{i}" if i < 100 else f"d{i - 100}" for i in ids])
    recorder.encoder_decoder = True
    rng = np.random.default_rng(0)

    def maps(queries: int, keys: int) -> np.ndarray:
        raw = rng.random((batch, HEADS, queries, keys), dtype=np.float32)
        return raw / raw.sum(-1, keepdims=True)

    def dense(tokens: int, width: int) -> np.ndarray:
        return rng.standard_normal((batch, tokens, width)).astype(np.float32)

    enc, dec = ENCODER_TOKENS, DECODER_TOKENS
    recorder.begin_pass(batch, token_ids=np.tile(np.arange(enc), (batch, 1)),
                        decoder_token_ids=np.tile(100 + np.arange(dec), (batch, 1)))
    for layer in range(layers):
        site = f"encoder.block.{layer}"
        recorder.put(f"{site}.attn", "attention", maps(enc, enc),
                     ("batch", "head", "query", "key"), attrs={"attention": "self"})
        recorder.put(f"{site}.mlp", "output", dense(enc, 16), ("batch", "token", "neuron"))
        recorder.put(site, "output", dense(enc, 8), ("batch", "token", "hidden"))
    for layer in range(layers):
        site = f"decoder.block.{layer}"
        recorder.put(f"{site}.self_attn", "attention", maps(dec, dec),
                     ("batch", "head", "decoder_query", "decoder_key"), attrs={"attention": "self"})
        recorder.put(f"{site}.cross_attn", "attention", maps(dec, enc),
                     ("batch", "head", "decoder_query", "key"), attrs={"attention": "cross"})
        recorder.put(f"{site}.mlp", "output", dense(dec, 16),
                     decoder_side(("batch", "token", "neuron")))
        recorder.put(site, "output", dense(dec, 8), decoder_side(("batch", "token", "hidden")))
    recorder.end_pass()
    recorder.close()
    return Path(path)


def degenerate_trace(path: Path | str) -> Path:
    """One-token text and 1x1 pooled maps: every map a view draws is 1x1 or constant."""
    attrs = new_group_attrs("numpy", np.__version__, {"class": "tiny"}, Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode="w")), Selection(), "numpy",
                        lambda ids: [f"w{i}" for i in ids])
    recorder.begin_pass(1, token_ids=np.array([[3]]))
    recorder.put("layers.0.attn", "attention", np.ones((1, 2, 1, 1), np.float32),
                 ("batch", "head", "query", "key"))
    recorder.put("layers.0", "output", np.full((1, 1, 4), 0.5, np.float32),
                 ("batch", "token", "hidden"))
    recorder.put("layers.1", "output", np.full((1, 1, 4), 0.5, np.float32),
                 ("batch", "token", "hidden"))
    recorder.put("layers.0.mlp", "output", np.full((1, 1, 6), 2.0, np.float32),
                 ("batch", "token", "neuron"))
    recorder.put("pool", "output", np.array([0.25, 0.5, 1.0], np.float32).reshape(1, 3, 1, 1),
                 ("batch", "channel", "height", "width"))
    recorder.end_pass()
    recorder.close()
    return Path(path)
