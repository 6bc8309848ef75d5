"""``model.generate(...)`` inside a trace: one generated sequence is one sample, and what is
stored for it equals one eager forward pass over the final sequences (the mask generate()
used, the position ids it built from it), for Llama (grouped-query attention, rotary
positions), GPT-2 and Mistral with a sliding window shorter than the sequences, under eager
attention and SDPA, greedy and sampled, on a batch of left-padded prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import layerscope
from layerscope.core.errors import CaptureError
from layerscope.core.naming import roles_of

from ._zoo import ATTENTION_ROLES

PROMPT = 6
NEW_TOKENS = 5
WINDOW = 4  # Mistral's sliding window: shorter than the prompt, and than prompt + new tokens
PADDING = (0, 2, 1)  # left padding of each prompt in the batch of 3
ATOL = 1e-5


@dataclass(frozen=True)
class Family:
    build: Callable[[str], nn.Module]
    attention: str  # site of layer {i}'s attention module
    layer: str  # site of layer {i}, whose output is the next hidden state
    norm: str  # the final norm: the last hidden state
    window: int | None = None


def _llama(implementation: str) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation=implementation,
    )).eval()


def _gpt2(implementation: str) -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=1, eos_token_id=2,
        attn_implementation=implementation,
    )).eval()


def _mistral(implementation: str) -> nn.Module:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(
        vocab_size=72, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
        attn_implementation=implementation,
    )).eval()


FAMILIES = {
    "llama": Family(_llama, "model.layers.{}.self_attn", "model.layers.{}", "model.norm"),
    "gpt2": Family(_gpt2, "transformer.h.{}.attn", "transformer.h.{}", "transformer.ln_f"),
    "mistral": Family(_mistral, "model.layers.{}.self_attn", "model.layers.{}", "model.norm",
                      window=WINDOW),
}


def prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 3 prompts, left-padded (the padding ids are arbitrary: masked out)."""
    ids = torch.randint(3, vocab, (len(PADDING), PROMPT), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    for row, padding in enumerate(PADDING):
        mask[row, :padding] = 0
    return ids, mask


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, sampled: bool,
             **kwargs: Any) -> torch.Tensor:
    torch.manual_seed(11)  # the same draws, traced or not
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=sampled,
                              pad_token_id=0, **{"max_new_tokens": NEW_TOKENS, **kwargs})


def reference_pass(model: nn.Module, sequences: torch.Tensor, prompt_mask: torch.Tensor) -> Any:
    """One eager forward pass over the final sequences, as generate() fed them: every generated
    token attended, positions counted from each prompt's first real token."""
    generated = sequences.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones(len(prompt_mask), generated,
                                              dtype=prompt_mask.dtype)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask, position_ids=positions,
                     output_attentions=True, output_hidden_states=True)


def trace_generate(tmp_path: Path, family: Family, implementation: str, sampled: bool,
                   **kwargs: Any) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    model = family.build(implementation)
    assert model.config._attn_implementation == implementation
    ids, mask = prompts(model.config.vocab_size)
    untraced = generate(model, ids, mask, sampled, **kwargs)
    path = tmp_path / "generate.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]):
        sequences = generate(model, ids, mask, sampled, **kwargs)
    # tracing changes nothing the model does
    np.testing.assert_array_equal(sequences.numpy(), untraced.numpy())
    reference = reference_pass(family.build("eager"), sequences, mask)
    return layerscope.open_trace(path), sequences, mask, reference


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_equals_one_pass_over_the_sequences(tmp_path, name, implementation, sampled):
    family = FAMILIES[name]
    check_against_one_pass(family, *trace_generate(tmp_path, family, implementation, sampled))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_static_cache_places_its_preallocated_keys_by_position(tmp_path, implementation):
    """A static cache hands every step keys for all its slots, later ones masked."""
    family = FAMILIES["llama"]
    check_against_one_pass(family, *trace_generate(tmp_path, family, implementation, False,
                                                   cache_implementation="static"))


def check_against_one_pass(family: Family, ds: Any, sequences: torch.Tensor,
                           prompt_mask: torch.Tensor, reference: Any) -> None:
    batch, length = sequences.shape
    fed = length - 1  # the last generated token is never fed back to the model
    assert ds.sizes["batch"] == batch and ds.sizes["token"] == PROMPT + NEW_TOKENS

    # labels: the tokens generate() returned, the step that made each, which are real
    ids = ds["token_id"].values
    np.testing.assert_array_equal(ids[:, :length], sequences.numpy())
    steps = ds["token_step"].values
    np.testing.assert_array_equal(steps[:, :PROMPT], 0)
    np.testing.assert_array_equal(steps[:, PROMPT:], np.arange(1, NEW_TOKENS + 1)[None]
                                  .repeat(batch, 0))
    token_mask = ds["token_mask"].values
    np.testing.assert_array_equal(token_mask[:, :PROMPT], prompt_mask.numpy().astype(bool))
    real = token_mask[:, :fed]  # (batch, position) of real tokens the model computed

    # hidden states: embeddings through the final norm, each at every real position fed
    layers = len(reference.attentions)
    assert len(reference.hidden_states) == layers + 1
    sites = [family.layer.format(i) for i in range(layers - 1)] + [family.norm]
    for site, expected in zip(sites, reference.hidden_states[1:], strict=True):
        var = ds[f"{site}@output"]
        assert roles_of(var) == ("batch", "token", "hidden"), (site, roles_of(var))
        values = var.values
        np.testing.assert_allclose(values[:, :fed][real], expected.numpy()[:, :fed][real],
                                   rtol=0, atol=ATOL, err_msg=site)
        assert np.isnan(values[:, fed:]).all(), f"{site}: a position never fed holds values"
        assert "never fed" in var.attrs["filled"], var.attrs

    # attention: the full causal map, each decode step one row, keys at their positions
    for i, expected in enumerate(reference.attentions):
        name_ = f"{family.attention.format(i)}@attention"
        var = ds[name_]
        assert roles_of(var) == ATTENTION_ROLES, (name_, roles_of(var))
        values, expected = var.values, expected.numpy()
        assert values.shape[-2:] == (PROMPT + NEW_TOKENS,) * 2
        rows = np.broadcast_to(real[:, None, :], values[:, :, :fed].shape[:-1])
        np.testing.assert_allclose(values[:, :, :fed, :length][rows],
                                   expected[:, :, :fed][rows], rtol=0, atol=ATOL, err_msg=name_)
        np.testing.assert_allclose(values[:, :, :fed].sum(-1)[rows], 1.0, rtol=0, atol=ATOL)
        assert np.isnan(values[:, :, fed:]).all(), name_
        if family.window is not None:  # keys the sliding window dropped are not attended
            query, key = np.arange(fed)[:, None], np.arange(values.shape[-1])[None]
            outside = np.broadcast_to(query - key >= family.window, values[:, :, :fed].shape)
            assert outside.any() and not values[:, :, :fed][outside].any(), name_

    # logits: generate() computes them at the last position of each step only
    logits = ds["lm_head@output"].values
    computed = slice(PROMPT - 1, fed)
    np.testing.assert_allclose(logits[:, computed], reference.logits.numpy()[:, computed],
                               rtol=0, atol=ATOL)
    assert np.isnan(logits[:, :PROMPT - 1]).all() and np.isnan(logits[:, fed:]).all()
    assert "prompt positions 0-4" in ds["lm_head@output"].attrs["filled"]


def test_generation_that_ends_keeps_each_sequence_length(tmp_path):
    """A sequence that made its end-of-sequence token is padded by generate() afterwards:
    those positions are marked unreal; the stored length stays prompt + max_new_tokens even
    when every sequence ended early, so repeated calls with the same settings append."""
    family = FAMILIES["llama"]
    model = family.build("eager")
    ids, mask = prompts(model.config.vocab_size)
    free = generate(model, ids, mask, sampled=False)
    eos = int(free[0, PROMPT + 1])  # what sample 0 makes second ends it there
    path = tmp_path / "ended.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]):
        first = generate(model, ids, mask, sampled=False, eos_token_id=eos)
        second = generate(model, ids, mask, sampled=False, eos_token_id=eos)
    ds = layerscope.open_trace(path)
    assert ds.sizes["batch"] == 6 and ds.sizes["token"] == PROMPT + NEW_TOKENS
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    token_mask = ds["token_mask"].values
    for row, sequence in enumerate(first.numpy()):
        generated = sequence[PROMPT:].tolist()
        made = generated.index(eos) + 1 if eos in generated else NEW_TOKENS
        np.testing.assert_array_equal(token_mask[row, PROMPT:PROMPT + made], True)
        np.testing.assert_array_equal(token_mask[row, PROMPT + made:], False)
    assert not token_mask[0, PROMPT + 2:].any()  # sample 0 ended at its second token
    reference = reference_pass(family.build("eager"), first, mask)
    fed = first.shape[1] - 1
    real = token_mask[:3, :fed]
    values = ds["model.norm@output"].values[:3]
    np.testing.assert_allclose(values[:, :fed][real],
                               reference.hidden_states[-1].numpy()[:, :fed][real],
                               rtol=0, atol=ATOL)


def test_beam_search_is_refused_and_nothing_is_stored(tmp_path):
    model = FAMILIES["gpt2"].build("eager")
    ids, mask = prompts(model.config.vocab_size)
    path = tmp_path / "beams.zarr"
    with pytest.raises(CaptureError, match="Greedy decoding and sampling"), \
            layerscope.trace(model, path):
        generate(model, ids, mask, sampled=False, num_beams=2)
    assert "generate" not in vars(model)  # the wrapper is gone with the block


def test_a_longer_generation_grows_the_store(tmp_path):
    """A second call with more new tokens appends: the token axis grows, the first call's
    sequences are filled beyond their end (and unmasked), the second's are whole."""
    family = FAMILIES["llama"]
    model = family.build("eager")
    ids, mask = prompts(model.config.vocab_size)
    path = tmp_path / "lengths.zarr"
    with layerscope.trace(model, path, kinds=["output"]):
        generate(model, ids, mask, sampled=False)
        longer = generate(model, ids, mask, sampled=False, max_new_tokens=NEW_TOKENS + 2)
    ds = layerscope.open_trace(path)
    rows = len(PADDING)
    assert ds.sizes["batch"] == 2 * rows and ds.sizes["token"] == PROMPT + NEW_TOKENS + 2
    token_mask = ds["token_mask"].values
    assert not token_mask[:rows, PROMPT + NEW_TOKENS:].any()
    np.testing.assert_array_equal(ds["token_id"].values[rows:], longer.numpy())
    states = ds["model.norm@output"].values
    assert np.isnan(states[:rows, PROMPT + NEW_TOKENS:]).all()
    reference = reference_pass(family.build("eager"), longer, mask)
    fed = longer.shape[1] - 1
    real = token_mask[rows:, :fed]
    np.testing.assert_allclose(states[rows:, :fed][real],
                               reference.hidden_states[-1].numpy()[:, :fed][real],
                               rtol=0, atol=ATOL)


def test_a_generation_that_raises_stores_nothing_and_the_trace_goes_on(tmp_path):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FailsOnThirdStep(StoppingCriteria):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("stopped by the test")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model = FAMILIES["llama"].build("sdpa")
    ids, mask = prompts(model.config.vocab_size)
    path = tmp_path / "raised.zarr"
    with layerscope.trace(model, path, kinds=["output"]):
        with pytest.raises(RuntimeError, match="stopped by the test"):
            generate(model, ids, mask, sampled=False,
                     stopping_criteria=StoppingCriteriaList([FailsOnThirdStep()]))
        expected = generate(model, ids, mask, sampled=False)
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete" and ds.sizes["batch"] == len(PADDING)
    np.testing.assert_array_equal(ds["token_id"].values, expected.numpy())


def test_a_cache_filled_before_the_trace_is_refused(tmp_path):
    """Positions the model computed before generate() (a prefilled cache) cannot be placed:
    refused, nothing stored."""
    from transformers import DynamicCache

    model = FAMILIES["llama"].build("sdpa")
    ids, mask = prompts(model.config.vocab_size)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :4], attention_mask=mask[:, :4], cache=cache, use_cache=True)
    path = tmp_path / "prefilled.zarr"
    with layerscope.trace(model, path):
        with pytest.raises(CaptureError, match="from an empty cache"):
            generate(model, ids, mask, sampled=False, cache=cache)
    assert layerscope.open_trace(path).attrs["committed_samples"] == 0


def test_the_heatmap_marks_where_generation_starts(tmp_path):
    """The attention heatmap of a traced generate() draws the sample over its own tokens and a
    dashed line on each axis before the first generated position."""
    from layerscope.renderers.attention import attention_heatmap

    model = FAMILIES["llama"].build("eager")
    ids, mask = prompts(model.config.vocab_size)
    path = tmp_path / "marked.zarr"
    with layerscope.trace(model, path, kinds=["attention"]):
        generate(model, ids, mask, sampled=False)
    ds = layerscope.open_trace(path)
    sample = 1  # left-padded by PADDING[1]: its own tokens start there
    fig = attention_heatmap(ds, layer=0, sample=sample)
    ax = fig.axes[0]
    first = PROMPT - PADDING[sample]  # generated positions, counted from the sample's start
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xydata()[0].tolist()[0] for line in dashed
                  if line.get_xydata()[0][0] == line.get_xydata()[1][0]) == [first - 0.5]
    assert sorted(line.get_xydata()[0].tolist()[1] for line in dashed
                  if line.get_xydata()[0][1] == line.get_xydata()[1][1]) == [first - 0.5]
    assert "generated after the dashed line" in ax.get_title()
    image = ax.get_images()[0]
    # the sample's own positions: its prompt and every generated token (the last one, never
    # fed back, is a row of fill)
    assert image.get_array().shape == (PROMPT + NEW_TOKENS - PADDING[sample],) * 2


def test_the_grid_and_head_view_mark_where_generation_starts(tmp_path):
    """The model view marks the boundary on every map, the head view under the last prompt
    token of each column; each over the sample's own tokens."""
    from layerscope.renderers.attention import attention_grid, head_view

    model = FAMILIES["gpt2"].build("eager")
    ids, mask = prompts(model.config.vocab_size)
    path = tmp_path / "marked.zarr"
    with layerscope.trace(model, path, kinds=["attention"]):
        generate(model, ids, mask, sampled=False)
    ds = layerscope.open_trace(path)
    sample = 2
    first = PROMPT - PADDING[sample]  # the first generated position in the sample's window
    grid = attention_grid(ds, sample=sample)
    maps = [ax for ax in grid.axes if ax.get_images()]
    assert len(maps) == 2 * 4  # layers x heads
    for ax in maps:
        dashed = [line.get_xydata() for line in ax.get_lines() if line.get_linestyle() == "--"]
        vertical = [xy[0, 0] for xy in dashed if xy[0, 0] == xy[1, 0]]
        horizontal = [xy[0, 1] for xy in dashed if xy[0, 1] == xy[1, 1]]
        assert vertical == [first - 0.5] and horizontal == [first - 0.5], dashed
        assert ax.get_images()[0].get_array().shape == (PROMPT + NEW_TOKENS - PADDING[sample],) * 2
    assert "generated after the dashed lines" in grid._suptitle.get_text()

    view = head_view(ds, layer=1, sample=sample, heads=[0, 3])
    ax = view.axes[0]
    marks = [line.get_xydata() for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(marks) == 2  # one under the queries' prompt, one under the keys'
    assert all(np.allclose(mark[:, 1], first - 0.5) for mark in marks)
    assert sorted(mark[0, 0] < 0.5 for mark in marks) == [False, True]  # left and right
    labels = [text.get_text() for text in ax.texts]
    assert len(labels) == 2 * (PROMPT + NEW_TOKENS - PADDING[sample])  # queries and keys
    assert "generated after the dashed line" in ax.get_title()


def test_a_long_prompt_and_an_early_stop_read_back_whole(tmp_path):
    """Positions are written in blocks as the steps come: a prompt longer than several blocks
    (the logits start in a late one) and a generation stopped long before max_new_tokens
    (blocks never reached) read back through the checked reader and verify."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopsAtThree(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt + 3)

    family = FAMILIES["llama"]
    model = family.build("sdpa")
    prompt, new_tokens = 37, 30
    ids = torch.randint(3, model.config.vocab_size, (2, prompt),
                        generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    path = tmp_path / "long.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]):
        sequences = generate(model, ids, mask, sampled=False, max_new_tokens=new_tokens,
                             stopping_criteria=StoppingCriteriaList([StopsAtThree()]))
    assert sequences.shape[1] == prompt + 3
    ds = layerscope.open_trace(path)  # the checked reader: every chunk read is checked
    assert ds.sizes["token"] == prompt + new_tokens
    reference = reference_pass(family.build("eager"), sequences, mask)
    fed = sequences.shape[1] - 1
    real = ds["token_mask"].values[:, :fed]
    logits = ds["lm_head@output"].values
    np.testing.assert_allclose(logits[:, prompt - 1:fed],
                               reference.logits.numpy()[:, prompt - 1:fed], rtol=0, atol=ATOL)
    assert np.isnan(logits[:, :prompt - 1]).all() and np.isnan(logits[:, fed:]).all()
    states = ds["model.norm@output"].values
    np.testing.assert_allclose(states[:, :fed][real],
                               reference.hidden_states[-1].numpy()[:, :fed][real],
                               rtol=0, atol=ATOL)
    maps = ds["model.layers.1.self_attn@attention"].values
    rows = np.broadcast_to(real[:, None, :], maps[:, :, :fed].shape[:-1])
    np.testing.assert_allclose(maps[:, :, :fed, :fed + 1][rows],
                               reference.attentions[1].numpy()[:, :, :fed][rows],
                               rtol=0, atol=ATOL)
    assert np.isnan(maps[:, :, fed:]).all()
    assert layerscope.verify(path).ok
