"""PyTorch backend details: output structures, inputs, dtypes, selection, clean-up, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

import layerscope
from layerscope.core import BackendError

from ..conftest import TEXTS, load_minilm


class Structured(nn.Module):
    """Returns a dict and a tuple, and calls one submodule twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.pair = Pair()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        first, second = self.pair(x)
        return {"logits": self.shared(self.shared(first)) * scale, "aux": second}


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


def hook_counts(model: nn.Module) -> list[tuple[str, int, Any]]:
    """Each module's hooks, and its own ``forward`` (an output hook may run inside it)."""
    return [(name, len(m._forward_hooks) + len(m._forward_pre_hooks), vars(m).get("forward"))
            for name, m in model.named_modules()]


def test_tuples_dicts_repeated_calls_and_inputs(tmp_path):
    torch.manual_seed(0)
    model = Structured()
    x, scale = torch.randn(4, 3), torch.full((4, 1), 0.5)
    path = tmp_path / "s.zarr"
    with layerscope.trace(model, path, kinds=["output", "input"]):
        with torch.no_grad():
            out = model(x, scale=scale)
    ds = layerscope.open_trace(path)
    np.testing.assert_array_equal(ds["root@output.logits"].values, out["logits"].numpy())
    np.testing.assert_array_equal(ds["root@output.aux"].values, out["aux"].numpy())
    np.testing.assert_array_equal(ds["pair@output"].values, (x + 1).numpy())
    np.testing.assert_array_equal(ds["pair@output.1"].values, (x * 2).numpy())
    np.testing.assert_array_equal(ds["root@input"].values, x.numpy())
    np.testing.assert_array_equal(ds["root@input.scale"].values, scale.numpy())
    with torch.no_grad():
        once = model.shared(x + 1)
        twice = model.shared(once)
    np.testing.assert_array_equal(ds["shared@output"].values, once.numpy())
    np.testing.assert_array_equal(ds["shared@output.call1"].values, twice.numpy())
    assert ds["shared@output.call1"].attrs["call_index"] == 1
    np.testing.assert_array_equal(ds["shared@input.call1"].values, once.numpy())


def test_bfloat16_is_stored_losslessly(tmp_path):
    model = nn.Linear(4, 4).to(torch.bfloat16)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    path = tmp_path / "bf16.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        out = model(x)
    stored = layerscope.open_trace(path)["root@output"].values
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, out.float().numpy())
    assert torch.equal(torch.from_numpy(stored).to(torch.bfloat16), out)


class NarrowTypes(nn.Module):
    """A linear layer's output handed on in dtypes NumPy lacks, and in two it cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.linear(x)
        narrow = {name: h.to(getattr(torch, name)) for name in
                  ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)}
        return {**narrow, "half_complex": torch.complex(h, -h).to(torch.complex32),
                "quantized": torch.quantize_per_tensor(h, 0.1, 0, torch.qint8),
                "sparse": h.to_sparse(), "plain": h}


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_dtypes_numpy_lacks_are_stored_widened_and_those_it_cannot_hold_are_skipped(tmp_path):
    """float8 as float32 and complex32 as complex64, exactly; a quantized and a sparse output
    are skipped with the reason recorded, and the rest of the trace is stored."""
    torch.manual_seed(0)
    model = NarrowTypes().eval()
    path = tmp_path / "t.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        out = model(torch.randn(3, 4))
    ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "complete"
    widened = {"float8_e4m3fn": torch.float32, "float8_e5m2": torch.float32,
               "half_complex": torch.complex64, "plain": torch.float32}
    for key, wide in widened.items():
        if key not in out:
            continue
        stored = ds[f"root@output.{key}"]
        assert stored.dims == ("batch", "hidden"), key
        np.testing.assert_array_equal(stored.values, out[key].to(wide).numpy(), err_msg=key)
        assert stored.dtype == torch.empty((), dtype=wide).numpy().dtype, key
    skipped = ds.attrs["skipped"]
    assert "root@output.quantized" not in ds and "root@output.sparse" not in ds
    assert "qint8" in skipped["root@output.quantized"] and \
        "dequantize" in skipped["root@output.quantized"]
    assert "sparse_coo" in skipped["root@output.sparse"] and \
        "to_dense()" in skipped["root@output.sparse"]


def test_tensor_without_batch_axis_is_skipped_and_recorded(tmp_path):
    class Broadcast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.table(torch.arange(3))[None].sum(-1)

    model = Broadcast()
    with layerscope.trace(model, tmp_path / "b.zarr"), torch.no_grad():
        out = model(torch.zeros(5, 3))
    ds = layerscope.open_trace(tmp_path / "b.zarr")
    np.testing.assert_array_equal(ds["root@output"].values, out.numpy())
    assert "table@output" not in ds
    assert ds.attrs["skipped"] == {"table@output": "shape (3, 3) has no leading batch axis of 5"}


def test_minilm_hooks_and_sdpa_restored_after_failures(minilm_folder, minilm_tokenizer, tmp_path):
    model = load_minilm(minilm_folder, "sdpa")
    before = hook_counts(model)
    original_sdpa = functional.scaled_dot_product_attention
    originals = (torch.softmax, functional.dropout, torch.Tensor.softmax)
    encoded = minilm_tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        def explode(module, args, error=error):
            raise error

        handle = model.encoder.layer[3].register_forward_pre_hook(explode)
        with pytest.raises(type(error)):
            with layerscope.trace(model, tmp_path / f"{type(error).__name__}.zarr"):
                with torch.no_grad():
                    model(**encoded)
        handle.remove()
        assert hook_counts(model) == before
        assert functional.scaled_dot_product_attention is original_sdpa
        assert (torch.softmax, functional.dropout, torch.Tensor.softmax) == originals
        assert "softmax" not in torch.Tensor.__dict__
    with torch.no_grad():
        plain = model(**encoded).last_hidden_state
    ds = layerscope.capture(model, TEXTS[:2], tmp_path / "after.zarr", "encoder.layer.5",
                            tokenizer=minilm_tokenizer)
    np.testing.assert_array_equal(ds["encoder.layer.5@output"].values, plain.numpy())


def test_unknown_model_names_installed_backends(tmp_path):
    with pytest.raises(BackendError, match="torch.*tensorflow.*jax"):
        layerscope.trace(object(), tmp_path / "x.zarr")
    with pytest.raises(BackendError, match="cannot handle"):
        layerscope.trace(nn.Linear(2, 2), tmp_path / "x.zarr", backend="jax")


def test_sites_lists_module_paths_and_attention(minilm_folder):
    model = load_minilm(minilm_folder, "eager")
    sites = {s.path: s for s in layerscope.sites(model)}
    assert sites["encoder.layer.0.attention.self"].is_attention
    assert not sites["encoder.layer.0.attention"].is_attention  # only the innermost
    assert sites["root"].module_type == "BertModel"


def test_rnn_hidden_states_are_batch_token_hidden(tmp_path):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)  # time-major: (token, batch, feature)
    x = torch.randn(5, 2, 3)
    path = tmp_path / "rnn.zarr"
    with layerscope.trace(lstm, path), torch.no_grad():
        steps, (h_n, c_n) = lstm(x)
    ds = layerscope.open_trace(path)
    assert ds.sizes["batch"] == 2
    assert ds["root@output"].dims == ("batch", "token", "hidden")
    np.testing.assert_array_equal(ds["root@output"].values, steps.transpose(0, 1).numpy())
    assert ds["root@output.1.0"].attrs["roles"] == ["batch", "rnn_layer", "hidden"]
    np.testing.assert_array_equal(ds["root@output.1.0"].values, h_n.transpose(0, 1).numpy())
    np.testing.assert_array_equal(ds["root@output.1.1"].values, c_n.transpose(0, 1).numpy())
