"""A site's output hook run inside the module's ``forward`` (backends/_torch_forward.py):
values equal to the model's own, the hook a forward hook would be where a forward hook of
the user's or a global one is there first, ``forward`` given back after the trace (also
where it was the module's own, or something wrapped it again), and its signature kept."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import layerscope
from layerscope.core import StoreOptions
from layerscope.core.gather import GatherPolicy

from .address_copies import count_address_copies, take_hook_way


@pytest.fixture(autouse=True, params=["c", "python"])
def hook_way(request, monkeypatch):
    """Each test with the C part's wrapper (core/_directc.c) and with the Python alone."""
    take_hook_way(request.param, monkeypatch.setattr)
    return request.param


class Scaled(nn.Module):
    """A module called with a keyword argument, returning a tuple (the general way)."""

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
        return x * scale, x + scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.scaled = Scaled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.scaled(self.fc1(x), scale=0.5)
        return self.fc2(first + second)


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every module's output, as forward hooks registered now see it."""
    seen: dict[str, np.ndarray] = {}
    handles = []
    for name, module in model.named_modules():
        def keep(module, args, output, name=name or "root"):
            for index, tensor in enumerate(output if isinstance(output, tuple) else (output,)):
                seen[f"{name}@output" + (f".{index}" if index else "")] = \
                    tensor.detach().clone().numpy()
        handles.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def traced(model: nn.Module, path, batches: list[torch.Tensor]):
    with torch.no_grad(), layerscope.trace(model, path):
        for x in batches:
            model(x)
    return layerscope.open_trace(path)


def test_values_kwargs_and_forward_given_back(tmp_path, hook_way, monkeypatch):
    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(3, 8) for _ in range(6)]
    copies = count_address_copies(monkeypatch.setattr)
    options = StoreOptions(gathering=GatherPolicy(batches=2, min_variables=1))
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr", options=options):
        wrapped = {name: vars(m).get("forward") for name, m in model.named_modules() if name}
        assert all(wrapped.values())  # each module but the root: its hook runs inside it
        assert inspect.signature(model.scaled.forward) == inspect.signature(Scaled().forward)
        assert not any(m._forward_hooks for name, m in model.named_modules() if name)
        for x in batches:
            model(x)
    assert all("forward" not in vars(m) for m in model.modules())
    ds = layerscope.open_trace(tmp_path / "t.zarr")
    for index, x in enumerate(batches):
        for name, value in outputs(model, x).items():
            stored = ds[name].isel(batch=slice(3 * index, 3 * index + 3)).values
            np.testing.assert_array_equal(stored, value, err_msg=name)
    # the common case taken by address: in C through the wrapper, or by the Python hook
    assert (copies.in_c() if hook_way == "c" else copies.python).count("fc1") >= 3


def test_a_users_forward_hook_first_keeps_the_hook_way(tmp_path):
    """A forward hook of the user's that changes the output runs before the trace's hook
    (registered first), so the stored value is the changed one, as before."""
    torch.manual_seed(0)
    model = Net()
    handle = model.fc1.register_forward_hook(lambda m, a, output: output * 10)
    x = torch.randn(3, 8)
    try:
        with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
            assert "forward" not in vars(model.fc1) and "forward" in vars(model.fc2)
            model(x)
        expected = model.fc1(x).detach().numpy()  # the user's hook applied
    finally:
        handle.remove()
    stored = layerscope.open_trace(tmp_path / "t.zarr")["fc1@output"].values
    np.testing.assert_array_equal(stored, expected)


def test_a_global_forward_hook_keeps_the_hook_way(tmp_path):
    torch.manual_seed(0)
    model = Net()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, output: None)
    try:
        with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
            assert not any("forward" in vars(m) for m in model.modules())
            model(torch.randn(3, 8))
    finally:
        handle.remove()
    assert "fc2@output" in layerscope.open_trace(tmp_path / "t.zarr")


def test_an_instance_forward_is_wrapped_and_given_back(tmp_path):
    """A forward of the module's own (as accelerate sets one) is called inside the wrapper
    and put back after the trace."""
    torch.manual_seed(0)
    model = Net()
    calls = []
    original = model.fc2.forward

    def own(x):
        calls.append(1)
        return original(x) + 1

    model.fc2.forward = own
    x = torch.randn(3, 8)
    ds = traced(model, tmp_path / "t.zarr", [x])
    assert vars(model.fc2)["forward"] is own and calls == [1]
    with torch.no_grad():
        expected = own(model.fc1(x).mul(0.5) + model.fc1(x).add(0.5)).numpy()
    np.testing.assert_array_equal(ds["fc2@output"].values, expected)


def test_wrapped_again_inside_the_trace_passes_through_after(tmp_path):
    """Something that wraps ``forward`` again while the trace runs keeps its wrapper: the
    trace's is left inside it and only passes calls through once the trace ended."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 8)
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        inner = model.fc2.forward

        def outer(*args, **kwargs):
            return inner(*args, **kwargs)

        model.fc2.forward = outer
        model(x)
    assert vars(model.fc2)["forward"] is outer
    with torch.no_grad():
        after = model(x)  # no trace: nothing recorded, nothing raised
    ds = layerscope.open_trace(tmp_path / "t.zarr")
    assert ds.sizes["batch"] == 3
    np.testing.assert_array_equal(ds["root@output"].values, after.numpy())


def test_a_failing_forward_and_a_failing_hook(tmp_path, monkeypatch):
    """An error in the forward or in the hook reaches the caller; the trace gives every
    ``forward`` back."""
    torch.manual_seed(0)
    model = Net()

    def broken(x):
        raise RuntimeError("forward failed")

    model.fc2.forward = broken
    with pytest.raises(RuntimeError, match="forward failed"):
        traced(model, tmp_path / "a.zarr", [torch.randn(3, 8)])
    assert vars(model.fc2)["forward"] is broken and "forward" not in vars(model.fc1)
    del model.fc2.forward

    from layerscope.backends import torch as torch_backend

    def failing_outputs(self, *args, **kwargs):
        raise ValueError("hook failed")

    monkeypatch.setattr(torch_backend._Capture, "outputs", failing_outputs)
    with pytest.raises(ValueError, match="hook failed"):
        traced(model, tmp_path / "b.zarr", [torch.randn(3, 8)])
    assert not any("forward" in vars(m) for m in model.modules())


def test_under_data_parallel_every_hook_stays_a_forward_hook(tmp_path):
    """``nn.DataParallel``'s replicas copy each module's attributes: a wrapped ``forward``
    would run the original module's on another device's inputs. On the CPU it runs the
    module itself; the hooks must be forward hooks all the same."""
    torch.manual_seed(0)
    model = nn.DataParallel(Net())
    x = torch.randn(3, 8)
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        assert not any("forward" in vars(m) for m in model.modules())
        assert model.module.fc1._forward_hooks
        model(x)
    with torch.no_grad():
        expected = model.module.fc1(x).numpy()
    stored = layerscope.open_trace(tmp_path / "t.zarr")
    name = next(n for n in stored.data_vars if n.endswith("fc1@output"))
    np.testing.assert_array_equal(stored[name].values, expected)
