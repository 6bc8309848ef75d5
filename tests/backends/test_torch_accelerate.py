"""Models dispatched by accelerate (``device_map`` with CPU and disk offload): traced without
disturbing accelerate's own hooks, which move weights in for each call and out after it.

Each dispatched model is traced beside the same weights loaded plainly: every variable is
stored bit for bit alike, with the same dims, and equals the dispatched model's own untraced
outputs; the model's outputs do not change while traced; accelerate's hooks are the same
objects after the block and still offload. A tensor on the meta device (weights never loaded)
is refused with the reason, never stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import (
    cpu_offload,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import layerscope
from layerscope.backends.torch import BACKEND
from layerscope.core import CaptureError

from ..zoo._zoo import assert_same_variables, captures

BATCH, LENGTH = 2, 6


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32)


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                      bos_token_id=0, eos_token_id=0)


#: accelerate's device maps: a layer and the head on disk, the rest in CPU memory
LLAMA_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu",
             "lm_head": "disk"}
GPT2_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
            "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.h.2": "disk",
            "transformer.ln_f": "cpu", "lm_head": "cpu"}


def saved(tmp_path: Path, model: nn.Module) -> Path:
    folder = tmp_path / "weights"
    model.save_pretrained(folder)
    return folder


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3))


def hook_state(model: nn.Module) -> list[tuple[Any, ...]]:
    """accelerate's hook and replaced forward, and torch's own hooks, module by module."""
    return [(name, getattr(m, "_hf_hook", None), m.__dict__.get("forward"),
             getattr(m, "_old_forward", None), len(m._forward_hooks),
             len(m._forward_pre_hooks)) for name, m in model.named_modules()]


def on_meta(model: nn.Module, prefix: str) -> bool:
    """Whether every weight under ``prefix`` is offloaded (on the meta device) now."""
    weights = [p for name, p in model.named_parameters() if name.startswith(prefix)]
    return bool(weights) and all(p.is_meta for p in weights)


def trace_once(model: nn.Module, path: Path, ids: torch.Tensor, **call: Any) -> tuple[Any, Any]:
    with layerscope.trace(model, path, kinds=["output", "attention", "input"]), torch.no_grad():
        out = model(input_ids=ids, **call)
    return layerscope.open_trace(path), out


def check_dispatched(tmp_path: Path, plain: nn.Module, dispatched: nn.Module,
                     offloaded: str, **call: Any) -> None:
    """``dispatched`` holds ``plain``'s weights; ``offloaded``: a module it keeps on disk."""
    ids = token_ids(plain.config.vocab_size)
    assert on_meta(dispatched, offloaded)  # accelerate offloads it between calls
    with torch.no_grad():
        untraced = dispatched(input_ids=ids, output_hidden_states=True, **call)
    before = hook_state(dispatched)  # after a call: transformers adds hooks of its own at one

    reference, plain_out = trace_once(plain, tmp_path / "plain.zarr", ids, **call)
    ds, out = trace_once(dispatched, tmp_path / "dispatched.zarr", ids, **call)

    assert torch.equal(out.logits, untraced.logits)  # the model's results are untouched
    assert torch.equal(out.logits, plain_out.logits)
    assert_same_variables(ds, reference)
    for name, var in captures(ds).items():
        np.testing.assert_array_equal(var.values, reference[name].values, err_msg=name)
    np.testing.assert_array_equal(ds["lm_head@output"].values, untraced.logits.numpy())
    stack = "model.layers" if "model.layers.0" in dict(dispatched.named_modules()) \
        else "transformer.h"
    for index, hidden in enumerate(untraced.hidden_states[1:-1]):  # the last one is normed
        np.testing.assert_array_equal(ds[f"{stack}.{index}@output"].values, hidden.numpy())
    assert ds.attrs["status"] == "complete" and not any(
        "meta" in reason for reason in ds.attrs.get("skipped", {}).values())

    # accelerate's hooks: the same objects, and still moving the weights in and out
    assert hook_state(dispatched) == before
    with torch.no_grad():
        again = dispatched(input_ids=ids, output_hidden_states=True, **call)
    assert torch.equal(again.logits, untraced.logits)
    assert on_meta(dispatched, offloaded)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_llama_from_pretrained_with_cpu_and_disk_offload(tmp_path, attention):
    torch.manual_seed(0)
    folder = saved(tmp_path, LlamaForCausalLM(llama_config()))
    plain = LlamaForCausalLM.from_pretrained(folder, attn_implementation=attention).eval()
    dispatched = LlamaForCausalLM.from_pretrained(
        folder, attn_implementation=attention, device_map=LLAMA_MAP,
        offload_folder=tmp_path / "offload").eval()
    assert type(dispatched.model.layers[1]._hf_hook).__name__ == "AlignDevicesHook"
    check_dispatched(tmp_path, plain, dispatched, "model.layers.1.")


def test_generate_on_a_dispatched_model(tmp_path):
    """generate() of a model with a layer and its head on disk: one sequence per sample, as
    from the same weights loaded plainly."""
    torch.manual_seed(5)
    folder = saved(tmp_path, LlamaForCausalLM(llama_config()))
    plain = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    dispatched = LlamaForCausalLM.from_pretrained(
        folder, attn_implementation="eager", device_map=LLAMA_MAP,
        offload_folder=tmp_path / "offload").eval()
    ids = token_ids(120)
    mask = torch.ones_like(ids)
    stores = {}
    for name, model in (("plain", plain), ("dispatched", dispatched)):
        stores[name] = tmp_path / f"{name}.zarr"
        with layerscope.trace(model, stores[name], kinds=["output", "attention"]), \
                torch.no_grad():
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=3,
                                       do_sample=False, pad_token_id=0)
        assert generated.shape == (BATCH, LENGTH + 3)
    ds, reference = (layerscope.open_trace(stores[name]) for name in ("dispatched", "plain"))
    assert_same_variables(ds, reference)
    for name, var in captures(ds).items():
        np.testing.assert_array_equal(var.values, reference[name].values, err_msg=name)
    np.testing.assert_array_equal(ds["token_id"].values, reference["token_id"].values)


def test_gpt2_load_checkpoint_and_dispatch(tmp_path):
    torch.manual_seed(1)
    folder = saved(tmp_path, GPT2LMHeadModel(gpt2_config()))
    plain = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with init_empty_weights():
        empty = GPT2LMHeadModel(gpt2_config())
    empty.tie_weights()  # the head's weight is the embedding's, saved once
    dispatched = load_checkpoint_and_dispatch(
        empty, str(folder / "model.safetensors"), device_map=GPT2_MAP,
        offload_folder=str(tmp_path / "offload")).eval()
    dispatched.config._attn_implementation = "eager"
    check_dispatched(tmp_path, plain, dispatched, "transformer.h.2.")


@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload"])
def test_everything_offloaded_and_captured_from_numpy_inputs(tmp_path, offload):
    """Every weight offloaded: none holds values to tell where inputs go. ``capture`` sends
    them to accelerate's execution device, not to the meta device the weights sit on."""
    torch.manual_seed(2)
    plain = GPT2LMHeadModel(gpt2_config()).eval()
    model = GPT2LMHeadModel(gpt2_config()).eval()
    model.load_state_dict(plain.state_dict())
    if offload == "cpu_offload":
        model = cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        model = disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    assert on_meta(model, "transformer.")
    ids = token_ids(120)
    ds = layerscope.capture(model, {"input_ids": ids.numpy()}, tmp_path / "t.zarr",
                            kinds=["output", "attention"])
    reference = layerscope.capture(plain, {"input_ids": ids.numpy()}, tmp_path / "p.zarr",
                                   kinds=["output", "attention"])
    assert_same_variables(ds, reference)
    for name, var in captures(ds).items():
        np.testing.assert_array_equal(var.values, reference[name].values, err_msg=name)
    with torch.no_grad():
        np.testing.assert_array_equal(ds["lm_head@output"].values, model(ids).logits.numpy())
    assert on_meta(model, "transformer.")


class Attending(nn.Module):
    """``nn.MultiheadAttention``, whose probabilities the backend recomputes by calling it
    once more after the traced call: accelerate must load its weights for that call too."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        mixed, _ = self.attn(h, h, h, need_weights=False)
        return self.out(mixed)


def test_multihead_attention_recomputed_with_its_weights_on_disk(tmp_path):
    torch.manual_seed(4)
    plain = Attending().eval()
    model = Attending().eval()
    model.load_state_dict(plain.state_dict())
    # preloaded: its forward reads out_proj's weight without calling out_proj
    model = dispatch_model(model, {"embed": "cpu", "attn": "disk", "out": "cpu"},
                           offload_dir=str(tmp_path / "offload"),
                           preload_module_classes=["MultiheadAttention"])
    assert on_meta(model, "attn.")
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        untraced = model(x)
    paths = {"plain": tmp_path / "p.zarr", "dispatched": tmp_path / "d.zarr"}
    for key, traced in (("plain", plain), ("dispatched", model)):
        with layerscope.trace(traced, paths[key], kinds=["output", "attention"]), \
                torch.no_grad():
            out = traced(x)
        assert torch.equal(out, untraced)
    ds, reference = layerscope.open_trace(paths["dispatched"]), layerscope.open_trace(paths["plain"])
    with torch.no_grad():
        h = plain.embed(x)
        _, weights = plain.attn(h, h, h, need_weights=True, average_attn_weights=False)
    np.testing.assert_array_equal(ds["attn@attention"].values, weights.numpy())
    for name, var in captures(ds).items():
        np.testing.assert_array_equal(var.values, reference[name].values, err_msg=name)
    assert on_meta(model, "attn.")


def test_meta_tensors_are_refused_with_the_reason(tmp_path):
    """Weights never loaded: the model computes on the meta device, where no values exist.
    The trace stops at the first such tensor, names it, and stores nothing of it."""
    with init_empty_weights():
        empty = GPT2LMHeadModel(gpt2_config())
    path = tmp_path / "meta.zarr"
    with pytest.raises(CaptureError, match=r"transformer\.wte@output: .*meta device.*load"):
        with layerscope.trace(empty, path), torch.no_grad():
            empty(token_ids(120))
    with pytest.warns(UserWarning, match="aborted"):
        ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "aborted" and ds.attrs["committed_batches"] == 0
    assert not captures(ds)

    with pytest.raises(CaptureError, match="input ids on the meta device"):
        with layerscope.trace(empty, tmp_path / "ids.zarr"), torch.no_grad():
            empty(token_ids(120).to("meta"))
    with pytest.raises(CaptureError, match="meta device"):
        BACKEND.to_numpy(torch.empty(2, 3, device="meta"))
