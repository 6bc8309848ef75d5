"""Functions the attention taps wrap are the framework's own again once the last trace that
wraps them ends, in whatever order traces on several threads end (backends/_patches.py)."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch.nn import functional
from transformers import BertConfig, BertModel

import layerscope
from layerscope.backends._patches import _PATCHED, original, wrapped


class Base:
    def twice(self, x: int) -> int:
        return 2 * x


class Child(Base):
    """``twice`` is inherited: once unwrapped, ``Child`` has no attribute of its own again."""


def adding(amount: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper that adds ``amount`` to what the function it wraps returns."""
    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: function(*args) + amount
    return wrap


def test_overlapping_blocks_that_end_first_in_first_out_restore_the_original():
    module = types.SimpleNamespace(double=lambda x: 2 * x)
    true_double = module.double
    first, second = ExitStack(), ExitStack()
    first.enter_context(wrapped(Child, "twice", adding(10)))
    first.enter_context(wrapped(module, "double", adding(10)))
    second.enter_context(wrapped(Child, "twice", adding(100)))
    second.enter_context(wrapped(module, "double", adding(100)))
    assert Child().twice(1) == 112 and module.double(1) == 112  # both wrappers, chained
    assert original(module, "double") is true_double
    first.close()  # the first to open ends first: the second's wrapper stays, alone
    assert Child().twice(1) == 102 and module.double(1) == 102
    second.close()
    assert module.double is true_double
    assert "twice" not in Child.__dict__ and Child().twice(1) == 2
    assert original(module, "double") is true_double


def test_a_wrapper_that_fails_to_install_leaves_the_attribute_and_the_registry_as_they_were():
    def failing(function: Callable[..., Any]) -> Callable[..., Any]:
        raise RuntimeError("no wrapper")

    with pytest.raises(RuntimeError, match="no wrapper"), wrapped(Child, "twice", failing):
        pass
    assert "twice" not in Child.__dict__ and not _PATCHED
    with wrapped(Child, "twice", adding(10)):
        with pytest.raises(RuntimeError, match="no wrapper"), wrapped(Child, "twice", failing):
            pass
        assert Child().twice(1) == 12  # the first block's wrapper, alone, as before
    assert "twice" not in Child.__dict__ and not _PATCHED


def _bert(implementation: str) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attn_implementation=implementation)
    return BertModel(config).eval()


def test_torch_traces_on_two_threads_ending_in_opening_order_restore_torch(tmp_path):
    """Thread a opens, b opens, a closes, b closes: each store has the model's own attention,
    and torch's functions are its own again (before, a's wrapper stayed on ``Tensor.softmax``)."""
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _bert("eager")(input_ids=ids, output_attentions=True).attentions
    functions = (functional.scaled_dot_product_attention, functional.dropout, torch.softmax,
                 torch.Tensor.softmax)
    assert "softmax" not in torch.Tensor.__dict__
    opened, a_closed = threading.Barrier(2), threading.Event()
    errors: list[BaseException] = []
    models = {"a": _bert("sdpa"), "b": _bert("eager")}  # made here: one seeded generator

    def run(name: str) -> None:
        try:
            model = models[name]
            with torch.no_grad(), layerscope.trace(model, tmp_path / f"{name}.zarr",
                                                   kinds=["attention"]):
                opened.wait(timeout=60)
                if name == "b":
                    a_closed.wait(timeout=60)
                model(input_ids=ids)
            if name == "a":
                a_closed.set()
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
            a_closed.set()

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert (functional.scaled_dot_product_attention, functional.dropout, torch.softmax,
            torch.Tensor.softmax) == functions
    assert "softmax" not in torch.Tensor.__dict__
    for name in "ab":
        ds = layerscope.open_trace(tmp_path / f"{name}.zarr")
        for layer in range(2):
            stored = ds[f"encoder.layer.{layer}.attention.self@attention"].values
            np.testing.assert_allclose(stored, reference[layer].numpy(), rtol=1e-5, atol=1e-6)


class Attending(nnx.Module):
    def __init__(self) -> None:
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                                rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.attention(x)


def test_jax_traces_ending_in_opening_order_restore_jax(tmp_path):
    """Two instances of one class, each traced into its own store: each store holds its own
    model's one batch (another traced instance is not taken for a copy ``nnx.jit`` made)."""
    homes = (jax.nn.softmax, nnx.softmax, jax.nn.dot_product_attention)
    calls = (Attending.__call__, nnx.MultiHeadAttention.__call__)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    first_model, second_model = Attending(), Attending()
    first = layerscope.trace(first_model, tmp_path / "first.zarr", kinds=["attention"])
    second = layerscope.trace(second_model, tmp_path / "second.zarr", kinds=["attention"])
    first.__enter__()
    second.__enter__()
    first_model(x)
    second_model(x)
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert (jax.nn.softmax, nnx.softmax, jax.nn.dot_product_attention) == homes
    assert (Attending.__call__, nnx.MultiHeadAttention.__call__) == calls
    maps = [layerscope.open_trace(tmp_path / f"{name}.zarr")["attention@attention"].values
            for name in ("first", "second")]
    assert maps[0].shape == maps[1].shape == (2, 2, 5, 5)
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_allclose(maps[0].sum(-1), 1.0, rtol=1e-5)
