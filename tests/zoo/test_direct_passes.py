"""From a site's second pass on, its output goes the short way into the writer (the backend's
``_put_direct``: no labeling run again; a gathered chunk's memory, or pool memory queued for
writing). Across model families, every pass of a trace of several must hold what a trace of
that pass alone holds (the general way), bit for bit: same-shaped passes, and a shorter one
along the token axis (filled past its length)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

import layerscope
from layerscope.core import StoreOptions
from layerscope.core import direct as direct_module
from layerscope.core.gather import GatherPolicy

from ..backends.address_copies import count_address_copies
from ._zoo import captures


def _text(vocab: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def inputs(seed: int, length: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(3, vocab, (2, length), generator=generator)}
    return inputs


def _t5(seed: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 64, (2, length), generator=generator),
            "decoder_input_ids": torch.randint(3, 64, (2, 3), generator=generator)}


def _pixels(size: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def inputs(seed: int, length: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(2, 3, size, size, generator=generator)}
    return inputs


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 40)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(input_ids))[0])


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], Any], bool]] = {
    # name: (model, inputs(seed, length), whether a pass may be shorter along its tokens)
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)),
             _text(64), True),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")),
        _text(80), True),
    "bert": (lambda: BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64)),
             _text(64), True),
    "t5": (lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0)), _t5, True),
    "vit": (lambda: ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4)), _pixels(16), False),
    "resnet": (lambda: ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
        _pixels(32), False),
    "lstm": (Recurrent, _text(40), True),
}
#: an encoder-decoder's labels depend on the side a call is on: it always goes the general way
GENERAL_ONLY = {"t5"}


def _trace(model: nn.Module, path: Any, passes: list[dict[str, torch.Tensor]],
           gathered: bool) -> Any:
    options = StoreOptions(gathering=GatherPolicy(enabled=gathered, min_variables=1))
    with layerscope.trace(model, path, options=options), torch.no_grad():
        for inputs in passes:
            model(**inputs)
    return layerscope.open_trace(path)


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_pass_holds_what_a_trace_of_it_alone_holds(tmp_path, monkeypatch, family,
                                                         gathered):
    build, make_inputs, shorter = MODELS[family]
    torch.manual_seed(0)
    model = build().eval()
    passes = [make_inputs(seed, 6) for seed in range(3)]
    if shorter:
        passes.append(make_inputs(3, 4))

    direct: list[bool] = []

    def counted(put: Any, taken: list[bool]) -> Any:
        def put_counted(self: Any, *args: Any) -> bool:
            taken.append(put(self, *args))
            return taken[-1]
        return put_counted

    monkeypatch.setattr(direct_module.SitePut, "put",
                        counted(direct_module.SitePut.put, direct))
    address_copies = count_address_copies(monkeypatch.setattr)  # contiguous, gathered
    together = _trace(model, tmp_path / "together.zarr", passes, gathered)
    by_address = address_copies()
    short_way = sum(direct) + len(by_address)
    assert (short_way > 0) == (family not in GENERAL_ONLY), short_way
    # the third pass lands in the chunk the second went to: copied by address
    assert bool(by_address) == (gathered and family not in GENERAL_ONLY), len(by_address)
    monkeypatch.undo()

    variables = captures(together)
    for number, inputs in enumerate(passes):
        alone = captures(_trace(model, tmp_path / f"alone{number}.zarr", [inputs], gathered))
        assert set(alone) <= set(variables), sorted(set(alone) - set(variables))
        for name, var in alone.items():
            stored = variables[name]
            assert stored.dims == var.dims, name
            rows = stored.values[2 * number:2 * number + 2]
            expected = var.values
            cut = rows[tuple(slice(0, n) for n in expected.shape)]
            np.testing.assert_array_equal(cut, expected, err_msg=f"{family} {name} {number}")
            if rows.shape != expected.shape and rows.dtype.kind == "f":  # shorter: filled
                rest = rows.copy()
                rest[tuple(slice(0, n) for n in expected.shape)] = np.nan
                assert np.isnan(rest).all(), f"{family} {name} {number}"
