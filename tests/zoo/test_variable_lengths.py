"""Dynamic padding: passes of different token lengths in one trace, one store.

GPT-2 (right padding), Llama (left padding) and BERT run two batches padded to different
lengths, as ``tokenizer(..., padding=True)`` would per batch. Every stored tensor equals the
model's own, sample by sample, within its pass's length; past it, the fill values; the
``token_mask`` coordinate is the pass's attention mask; ``layerscope.sample`` gives each
sample over its own tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import layerscope

VOCAB = 64
#: the real lengths of the samples of each pass (each pass padded to its longest)
PASSES = ((3, 5), (12, 7, 9))


def _gpt2() -> Any:
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                      attn_implementation="eager"))


def _llama() -> Any:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, attn_implementation="eager"))


def _bert() -> Any:
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                attn_implementation="eager"))


MODELS: dict[str, tuple[Callable[[], Any], str]] = {
    "gpt2": (_gpt2, "right"), "llama": (_llama, "left"), "bert": (_bert, "right"),
}


def _batch(lengths: tuple[int, ...], side: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of texts of ``lengths`` padded to the longest on ``side``."""
    width = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        real = slice(0, length) if side == "right" else slice(width - length, width)
        ids[row, real] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, real] = 1
    return ids, mask


def _own_outputs(model: Any) -> tuple[dict[str, list[np.ndarray]], list[Any]]:
    """Every module output that is one tensor, per pass, recorded by the model's own hooks."""
    own: dict[str, list[np.ndarray]] = {}

    def hook(module: Any, args: Any, output: Any, name: str) -> None:
        if isinstance(output, torch.Tensor) and output.dim() >= 2:
            own.setdefault(name, []).append(output.detach().numpy().copy())

    handles = [module.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
               for name, module in model.named_modules() if name]
    return own, handles


@pytest.mark.parametrize("family", sorted(MODELS))
def test_passes_of_different_lengths_share_one_store(tmp_path, family):
    build, side = MODELS[family]
    torch.manual_seed(0)
    model = build().eval()
    batches = [_batch(lengths, side, seed) for seed, lengths in enumerate(PASSES)]
    own, handles = _own_outputs(model)
    attentions = []
    path = tmp_path / f"{family}.zarr"
    try:
        with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
            for ids, mask in batches:
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
                attentions.append([a.numpy().copy() for a in out.attentions])
    finally:
        for handle in handles:
            handle.remove()
    ds = layerscope.open_trace(path)
    longest = max(max(lengths) for lengths in PASSES)
    assert ds.sizes["token"] == longest
    assert ds.sizes["batch"] == sum(len(lengths) for lengths in PASSES)

    starts = np.cumsum([0, *(len(lengths) for lengths in PASSES)])
    compared = 0
    for name, values in own.items():
        if f"{name}@output" not in ds.data_vars:
            continue
        var = ds[f"{name}@output"]
        if var.dims[:2] != ("batch", "token"):
            continue
        stored = var.values
        for number, value in enumerate(values):
            rows = stored[starts[number]:starts[number + 1]]
            width = value.shape[1]
            np.testing.assert_array_equal(rows[:, :width], value, err_msg=name)
            assert np.isnan(rows[:, width:]).all(), name
        compared += 1
    assert compared >= 4

    names = sorted((v for v in ds.data_vars if str(v).endswith("@attention")),
                   key=lambda v: ds[v].attrs["layer"])
    assert len(names) == len(attentions[0])
    for layer, name in enumerate(names):
        stored = ds[name].values
        for number, maps in enumerate(attentions):
            rows = stored[starts[number]:starts[number + 1]]
            width = maps[layer].shape[-1]
            np.testing.assert_array_equal(rows[:, :, :width, :width], maps[layer], err_msg=name)
            assert np.isnan(rows[:, :, width:, :]).all() and np.isnan(rows[..., width:]).all()

    ids = ds["token_id"].values
    real = ds["token_mask"].values
    for number, (batch_ids, batch_mask) in enumerate(batches):
        rows = slice(starts[number], starts[number + 1])
        width = batch_ids.shape[1]
        np.testing.assert_array_equal(ids[rows, :width], batch_ids.numpy())
        assert (ids[rows, width:] == -1).all()
        np.testing.assert_array_equal(real[rows, :width], batch_mask.numpy().astype(bool))
        assert not real[rows, width:].any()

    last = next(n for n in own if f"{n}@output" in ds.data_vars
                and ds[f"{n}@output"].dims[:2] == ("batch", "token"))
    for number, (_, batch_mask) in enumerate(batches):
        for row in range(batch_mask.shape[0]):
            one = layerscope.sample(ds, int(starts[number] + row))
            keep = batch_mask[row].numpy().astype(bool)
            assert one.sizes["token"] == int(keep.sum())
            np.testing.assert_array_equal(one[f"{last}@output"].values,
                                          own[last][number][row][keep])
            np.testing.assert_array_equal(one["token"].values, np.flatnonzero(keep))


SHORT = ["a cat", "the dog ran home"]
LONG = ["a much longer sentence that has many more tokens than any text stored before it, "
        "so the store must grow to hold it"]


def _tokenized_bert(tokenizer: Any) -> Any:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, attn_implementation="eager")).eval()


def test_dynamic_padding_with_a_tokenizer_in_one_trace(tmp_path, minilm_tokenizer):
    """``tokenizer(..., padding=True)`` per batch: each batch padded to its own longest."""
    model = _tokenized_bert(minilm_tokenizer)
    path = tmp_path / "t.zarr"
    encoded = [minilm_tokenizer(texts, padding=True, return_tensors="pt")
               for texts in (SHORT, LONG + SHORT[:1])]
    outputs = []
    with layerscope.trace(model, path, kinds=["output"]), torch.no_grad():
        for inputs in encoded:
            outputs.append(model(**inputs).last_hidden_state.numpy().copy())
    ds = layerscope.open_trace(path)
    name = "encoder.layer.1.output@output"
    stored = ds[name].values
    row = 0
    for inputs, output in zip(encoded, outputs, strict=True):
        for ids, mask, own in zip(inputs["input_ids"], inputs["attention_mask"], output,
                                  strict=True):
            width = len(ids)
            np.testing.assert_array_equal(stored[row, :width], own)
            assert np.isnan(stored[row, width:]).all()
            one = layerscope.sample(ds, row)
            np.testing.assert_array_equal(one["token_id"].values, ids[mask.bool()].numpy())
            np.testing.assert_array_equal(one[name].values, own[mask.bool().numpy()])
            row += 1
    hidden = layerscope.masked(ds)[name].values
    assert np.isnan(hidden[~ds["token_mask"].values]).all()
    assert not np.isnan(hidden[ds["token_mask"].values]).any()


def test_an_append_with_a_longer_text_grows_the_store(tmp_path, minilm_tokenizer):
    """``capture(..., mode="a")`` never cuts a text to the stored length."""
    model = _tokenized_bert(minilm_tokenizer)
    path = tmp_path / "t.zarr"
    layerscope.capture(model, SHORT, path, tokenizer=minilm_tokenizer)
    short = layerscope.open_trace(path).sizes["token"]
    ds = layerscope.capture(model, LONG, path, tokenizer=minilm_tokenizer,
                            mode="a")
    own = minilm_tokenizer(LONG, return_tensors="pt")
    assert ds.sizes["token"] == own["input_ids"].shape[1] > short
    np.testing.assert_array_equal(ds["token_id"].values[2], own["input_ids"][0].numpy())
    with torch.no_grad():
        expected = model(**own).last_hidden_state[0].numpy()
    np.testing.assert_array_equal(ds["encoder.layer.1.output@output"].values[2], expected)
    first = minilm_tokenizer(SHORT, padding=True)["input_ids"]
    assert (ds["token_id"].values[:2, short:] == -1).all()
    np.testing.assert_array_equal(ds["token_id"].values[:2, :short], np.asarray(first))
    assert ds["token_mask"].values[2].all()
    assert ds.attrs["committed_batches"] == 2
