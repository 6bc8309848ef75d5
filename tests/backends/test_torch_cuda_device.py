"""The CUDA capture path on a real GPU (skipped where torch sees none, as on CI's machines).

Each check compares what layerscope stored from tensors on the GPU with what the model itself
returned, seen by plain forward hooks and copied to the host by ``.cpu()`` outside layerscope:
bit for bit in float32, and in bfloat16 widened to float32 (exact). Several batches run, so
pinned buffers are reused; an in-place op of the model after the hook must not reach the
stored values; reductions run on the device and only their results come off it; a model
spread by accelerate over the GPU, CPU memory and the disk is traced as untraced.
``test_torch_cuda_copy.py`` checks the same ordering on CPU with a fake device.
"""

from __future__ import annotations

import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import layerscope
from layerscope.backends import _torch_cuda
from layerscope.core.direct import SitePut
from tests import reduce_reference as ref

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS, VOCAB, BATCHES = 3, 120, 4


def llama(dtype: torch.dtype, attention: str = "eager") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation=attention)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


def batches(count: int = BATCHES, batch: int = 2, length: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(1, VOCAB, (batch, length), generator=generator).cuda()
            for _ in range(count)]


def own_outputs(model: nn.Module, sites: list[str], calls: list[dict[str, Any]]
                ) -> dict[str, list[np.ndarray]]:
    """What each module at ``sites`` returned (its first tensor), call by call, and the
    attention maps the model returns (under ``"attentions.N"``)."""
    seen: dict[str, list[np.ndarray]] = {site: [] for site in sites}
    modules = dict(model.named_modules())

    def keep(site: str, out: Any) -> None:
        tensor = out[0] if isinstance(out, tuple) else out
        seen[site].append(tensor.detach().float().cpu().numpy())

    handles = [modules[site].register_forward_hook(lambda m, a, out, s=site: keep(s, out))
               for site in sites]
    try:
        with torch.no_grad():
            for call in calls:
                output = model(**call, output_attentions=True)
                for layer, maps in enumerate(output.attentions):
                    seen.setdefault(f"attentions.{layer}", []).append(
                        maps.float().cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return seen


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_outputs_and_attention_maps_equal_the_models_own(tmp_path: Path,
                                                                  dtype: torch.dtype) -> None:
    model = llama(dtype)
    calls = [{"input_ids": ids} for ids in batches()]
    sites = [f"model.layers.{i}" for i in range(LAYERS)]
    own = own_outputs(model, sites, calls)
    path = tmp_path / "t.zarr"
    with layerscope.trace(model, path, ["model.layers.?@output",
                                        "model.layers.*.self_attn@attention"]), torch.no_grad():
        for call in calls:
            model(**call)
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete"
    assert ds.sizes["batch"] == 2 * BATCHES
    for layer, site in enumerate(sites):
        stored = ds[f"{site}@output"]
        assert stored.dtype == np.float32 and stored.dims == ("batch", "token", "hidden")
        np.testing.assert_array_equal(stored.values, np.concatenate(own[site]), err_msg=site)
        maps = ds[f"{site}.self_attn@attention"]
        assert maps.dims == ("batch", "head", "query", "key")
        np.testing.assert_array_equal(maps.values, np.concatenate(own[f"attentions.{layer}"]),
                                      err_msg=f"{site} attention")


@needs_cuda
def test_pinned_buffers_are_reused_batch_after_batch(tmp_path: Path) -> None:
    model = llama(torch.float32)
    calls = [{"input_ids": ids} for ids in batches(count=12)]
    made = []
    with layerscope.trace(model, tmp_path / "t.zarr", "model.layers.?@output"), torch.no_grad():
        for call in calls:
            model(**call)
            torch.cuda.synchronize()
            made.append(_torch_cuda.COPIES.pool.made)
    # buffers of three same-sized outputs a batch: the pool stops growing once the writer
    # gives the first ones back, long before the twelfth batch
    assert made[-1] == made[len(made) // 2], made
    assert made[-1] < LAYERS * len(calls), made


class InPlace(nn.Module):
    """A linear layer whose output the next layer overwrites in place, right after the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, 4096)
        self.relu = nn.ReLU(inplace=True)
        self.scale = nn.Linear(4096, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)
        return self.scale(self.relu(hidden))


@needs_cuda
def test_an_in_place_op_after_the_hook_does_not_reach_the_stored_values(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = InPlace().cuda().eval()
    inputs = [torch.randn(64, 512, generator=torch.Generator().manual_seed(i)).cuda()
              for i in range(3)]
    with torch.no_grad():
        expected = [model.linear(x).cpu().numpy() for x in inputs]
    path = tmp_path / "t.zarr"
    with layerscope.trace(model, path, "linear@output"), torch.no_grad():
        for x in inputs:
            model(x)
    stored = layerscope.open_trace(path)["linear@output"].values
    assert (np.concatenate(expected) < 0).any()  # the ReLU would have changed these
    np.testing.assert_array_equal(stored, np.concatenate(expected))


@needs_cuda
def test_reductions_run_on_the_device_and_only_their_results_come_off_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama(torch.float32)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, :9] = 0
    call = {"input_ids": torch.randint(1, VOCAB, (3, 12),
                                       generator=torch.Generator().manual_seed(2)).cuda(),
            "attention_mask": mask.cuda()}
    sites = [f"model.layers.{i}" for i in range(LAYERS)]
    own = {site: values[0] for site, values in own_outputs(model, sites, [call]).items()}
    copied: list[tuple[int, ...]] = []
    original = _torch_cuda.COPIES.copy

    def counted(tensor: torch.Tensor) -> Any:
        copied.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(_torch_cuda.COPIES, "copy", counted)
    path = tmp_path / "r.zarr"
    with layerscope.trace(model, path, "model.layers.?@output", positions="last",
                          reduce=["norm", "topk(4)"]), torch.no_grad():
        model(**call)
    ds = layerscope.open_trace(path)
    host_mask = mask.numpy()
    for site in sites:
        x = own[site]
        last = ref.last(x, host_mask)
        np.testing.assert_array_equal(last, x[:, -1])
        np.testing.assert_allclose(ds[f"{site}@output:last(token):norm(hidden)"].values,
                                   ref.norm(last), rtol=1e-5)
        values, index = ref.topk(last, 4)
        np.testing.assert_array_equal(ds[f"{site}@output:last(token):topk(hidden,4)"].values,
                                      values)
        np.testing.assert_array_equal(
            ds[f"{site}@output:last(token):topk(hidden,4):index"].values, index)
    hidden = model.config.hidden_size
    assert copied and all(np.prod(shape) <= 3 * hidden for shape in copied), copied
    assert (3, 12, hidden) not in copied  # no whole block output left the device


@needs_cuda
@pytest.mark.parametrize("select", [{}, {"positions": "last"},
                                    {"reduce": ["mean", "norm", "topk(4)"]}],
                         ids=["whole", "last", "reduced"])
def test_hooks_never_wait_for_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         select: dict[str, Any]) -> None:
    """A forward bound by the host's kernel launches keeps its lead over the device only if
    no hook waits for the device: after the first pass, layerscope's only synchronizing
    calls are the copies of the pass's token ids and mask to the host, at its start (the
    store's token coordinates). The model's own (transformers checks the mask) aside.
    Whole outputs take the direct way (no labeling) and are exact."""
    model = llama(torch.bfloat16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :6] = 0  # left padding: positions and means take their masked ways
    calls = [{"input_ids": ids, "attention_mask": mask.cuda()} for ids in batches(count=5)]
    watched = calls[2:]  # once the direct way is set up (the first batch decides gathering)
    sites = [f"model.layers.{i}" for i in range(LAYERS)]
    own = own_outputs(model, sites, calls)
    held = []
    put_held = SitePut.put_held

    def counted(self: SitePut, *args: Any) -> bool:
        held.append(put_held(self, *args))
        return held[-1]

    monkeypatch.setattr(SitePut, "put_held", counted)
    path = tmp_path / "t.zarr"
    stacks: list[list[str]] = []  # layerscope's functions below each synchronizing call
    ours = str(Path(layerscope.__file__).parent)
    model_thread = threading.current_thread()

    def show(message: Any, *rest: Any, **kw: Any) -> None:
        # the writer threads wait for the copies by design
        if "synchronizing" in str(message) and threading.current_thread() is model_thread:
            stacks.append([f"{Path(frame.filename).name}:{frame.lineno}:{frame.name}"
                           for frame in traceback.extract_stack()
                           if frame.filename.startswith(ours)])

    with layerscope.trace(model, path, "model.layers.?@output", **select), torch.no_grad():
        for call in calls[:2]:
            model(**call)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            monkeypatch.setattr(warnings, "showwarning", show)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for call in watched:
                    model(**call)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    ours_waiting = [stack for stack in stacks if stack]  # the model's own calls aside
    assert all(stack[-1].endswith(":_root_values") and
               any(frame.endswith(":begin") for frame in stack) for stack in ours_waiting), \
        ours_waiting
    assert len(ours_waiting) == 2 * len(watched)  # the ids and the mask, at each start
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete"
    if select:
        assert not any(held)  # reductions are labeled pass after pass
        return
    assert held == [True] * LAYERS * (len(calls) - 1)  # every site, from the second pass on
    for site in sites:
        np.testing.assert_array_equal(ds[f"{site}@output"].values, np.concatenate(own[site]),
                                      err_msg=site)


@needs_cuda
def test_a_model_spread_over_the_gpu_cpu_and_disk_is_traced_as_untraced(tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="eager")
    folder = tmp_path / "weights"
    LlamaForCausalLM(config).save_pretrained(folder)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": 0,
                  "lm_head": 0}
    model = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                             device_map=device_map,
                                             offload_folder=tmp_path / "offload").eval()
    ids = batches(count=1)[0]
    sites = [f"model.layers.{i}" for i in range(LAYERS)]
    own = own_outputs(model, sites, [{"input_ids": ids}])
    with torch.no_grad():
        untraced = model(input_ids=ids).logits
    path = tmp_path / "t.zarr"
    with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
        traced = model(input_ids=ids).logits
    assert torch.equal(traced, untraced)
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete"
    np.testing.assert_array_equal(ds["lm_head@output"].values, untraced.cpu().numpy())
    for layer, site in enumerate(sites):
        np.testing.assert_array_equal(ds[f"{site}@output"].values, own[site][0], err_msg=site)
        np.testing.assert_array_equal(ds[f"{site}.self_attn@attention"].values,
                                      own[f"attentions.{layer}"][0], err_msg=site)
