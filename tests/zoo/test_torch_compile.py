"""A ``torch.compile``d model traces eagerly through the module it wraps: no compile or
recompile while attached, names without ``_orig_mod.``, the wrapped model's class recorded,
values bit for bit those of the uncompiled model; afterwards the compiled graph runs as before.
The dynamo ``eager`` backend keeps the test fast: what is checked (when dynamo compiles) does
not depend on the backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel

import layerscope

from ._zoo import attention_variables, captures

LAYERS = 2


def _compiles() -> tuple[int, int]:
    """Frames dynamo has compiled so far and graphs it has made."""
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=64, bos_token_id=1,
                        eos_token_id=2)  # SDPA: maps recomputed from its query and key
    return GPT2LMHeadModel(config).eval()


def _assert_same_trace(compiled_ds, plain_ds) -> None:
    stored, expected = captures(compiled_ds), captures(plain_ds)
    assert set(stored) == set(expected)
    for name, var in stored.items():
        assert var.dims == expected[name].dims, name
        np.testing.assert_array_equal(var.values, expected[name].values, err_msg=name)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_model_traces_eagerly_without_recompiling(tmp_path, batch):
    torch._dynamo.reset()
    model = _gpt2()
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(3, 64, (batch, 6), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        before = compiled(input_ids=ids).logits
    compiled_once = _compiles()
    assert compiled_once[0] >= 1  # dynamo did compile it

    path = tmp_path / "compiled.zarr"
    with layerscope.trace(compiled, path), torch.no_grad():
        for _ in range(3):
            compiled(input_ids=ids)
    assert _compiles() == compiled_once  # hooks forced no recompile
    with torch.no_grad():
        after = compiled(input_ids=ids).logits
    assert _compiles() == compiled_once  # the graph compiled before the trace serves again
    assert torch.equal(after, before)

    plain = tmp_path / "plain.zarr"
    with layerscope.trace(model, plain), torch.no_grad():
        for _ in range(3):
            model(input_ids=ids)
    ds, reference = layerscope.open_trace(path), layerscope.open_trace(plain)
    assert not [name for name in captures(ds) if "_orig_mod" in name]
    assert ds.attrs["model"]["class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    assert set(attention_variables(ds)) == {f"transformer.h.{i}.attn@attention"
                                            for i in range(LAYERS)}
    assert ds.sizes["batch"] == 3 * batch
    _assert_same_trace(ds, reference)
    assert [s.path for s in layerscope.sites(compiled)] == [s.path for s in layerscope.sites(model)]


def test_module_compiled_in_place_traces_eagerly(tmp_path):
    """``module.compile()`` compiles the module's own call: hooks fire once it runs eagerly."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    plain = tmp_path / "plain.zarr"
    with layerscope.trace(model, plain), torch.no_grad():
        model(x)
    model.compile(backend="eager")
    with torch.no_grad():
        model(x)
    compiled_once = _compiles()
    assert compiled_once[0] >= 1
    path = tmp_path / "compiled.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(x)
        model(x)
    assert _compiles() == compiled_once
    ds = layerscope.open_trace(path)
    assert ds.sizes["batch"] == 6
    reference = layerscope.open_trace(plain)
    assert set(captures(ds)) == set(captures(reference)) == {
        "0@output", "1@output", "2@output", "3@output", "root@output"}
    for name, var in captures(ds).items():
        np.testing.assert_array_equal(var.values[:3], reference[name].values, err_msg=name)
