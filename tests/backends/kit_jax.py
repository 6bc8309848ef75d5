"""Tiny Flax NNX models for the backend conformance suite.

Each model's ``__call__`` takes an optional ``keep`` dict: when given, every layer's return
value is stored in it under the layer's path. That is how the references are computed, by
Flax itself, with no layerscope involved. ``JaxJitKit`` runs the same models through
``nnx.jit`` (the references then come from a jitted call too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights

from layerscope.testing import Case, Kit

Keep = dict[str, Any] | None


def _keep(keep: Keep, site: str, value: Any) -> Any:
    if keep is not None:
        keep[site] = value
    return value


class TinyMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: jax.Array, keep: Keep = None) -> jax.Array:
        h = nnx.relu(_keep(keep, "hidden", self.hidden(x)))
        return _keep(keep, "root", _keep(keep, "out", self.out(h)))


class TinyTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(20, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(16, 32, rngs=rngs), nnx.gelu,
                                  nnx.Linear(32, 16, rngs=rngs))

    def __call__(self, ids: jax.Array, keep: Keep = None) -> jax.Array:
        x = _keep(keep, "embed", self.embed(ids))
        x = _keep(keep, "norm", self.norm(x + _keep(keep, "attn", self.attn(x))))
        if keep is not None:
            _keep(keep, "mlp.layers.0", self.mlp.layers[0](x))
        return x + _keep(keep, "mlp", self.mlp(x))


class TinyCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs)
        self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(36, 5, rngs=rngs)

    def __call__(self, x: jax.Array, keep: Keep = None) -> jax.Array:
        x = nnx.relu(_keep(keep, "norm", self.norm(_keep(keep, "conv", self.conv(x)))))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return _keep(keep, "head", self.head(x.reshape(x.shape[0], -1)))


class TinyRNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.gru = nnx.RNN(nnx.GRUCell(4, 6, rngs=rngs), rngs=rngs)
        self.lstm = nnx.RNN(nnx.LSTMCell(6, 5, rngs=rngs), time_major=True, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array, keep: Keep = None) -> jax.Array:
        steps = _keep(keep, "gru", self.gru(x))
        steps = self.lstm(steps.swapaxes(0, 1))  # time-major: (token, batch, hidden)
        _keep(keep, "lstm", steps.swapaxes(0, 1))  # stored batch first
        return _keep(keep, "head", self.head(steps[-1]))


class Exploding(nnx.Module):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


class JaxKit(Kit):
    framework = "jax"

    def build(self, kind: str) -> Case:
        rngs = nnx.Rngs(0)
        if kind == "mlp":
            sites = {"hidden": ("batch", "hidden"), "out": ("batch", "hidden"),
                     "root": ("batch", "hidden")}
            return Case(TinyMLP(rngs), sites, batch_size=5)
        if kind == "transformer":
            roles = ("batch", "token", "hidden")
            sites = {"embed": roles, "attn": roles, "norm": roles, "mlp.layers.0": roles,
                     "mlp": roles}
            return Case(TinyTransformer(rngs), sites, batch_size=3, attention_site="attn")
        if kind == "cnn":
            image = ("batch", "height", "width", "channel")
            sites = {"conv": image, "norm": image, "head": ("batch", "hidden")}
            return Case(TinyCNN(rngs), sites, batch_size=4)
        if kind == "rnn":
            seq = ("batch", "token", "hidden")
            return Case(TinyRNN(rngs), {"gru": seq, "lstm": seq, "head": ("batch", "hidden")},
                        batch_size=2)
        raise ValueError(kind)

    def inputs(self, case: Case, batch: int) -> jax.Array:
        rng = np.random.default_rng(batch)
        model = case.model
        if isinstance(model, TinyTransformer):
            return jnp.asarray(rng.integers(0, 20, (case.batch_size, 7)), dtype=jnp.int32)
        if isinstance(model, TinyRNN):
            return jnp.asarray(rng.standard_normal((case.batch_size, 6, 4), np.float32))
        if isinstance(model, TinyCNN):
            return jnp.asarray(rng.standard_normal((case.batch_size, 8, 8, 1), np.float32))
        return jnp.asarray(rng.standard_normal((case.batch_size, 4), np.float32))

    def array_input(self, case: Case, batch: int) -> np.ndarray:
        return np.asarray(self.inputs(case, batch))

    def call(self, model: nnx.Module, x: jax.Array) -> Any:
        return model(x)

    def intermediates(self, model: nnx.Module, x: jax.Array) -> dict[str, Any]:
        keep: dict[str, Any] = {}
        model(x, keep=keep)
        return keep

    def run(self, case: Case, batch: int) -> None:
        jax.block_until_ready(self.call(case.model, self.inputs(case, batch)))

    def reference(self, case: Case, batch: int, site: str) -> np.ndarray:
        return np.asarray(self.intermediates(case.model, self.inputs(case, batch))[site])

    def reference_attention(self, case: Case, batch: int) -> np.ndarray:
        model = case.model
        x = model.embed(self.inputs(case, batch))
        weights = dot_product_attention_weights(model.attn.query(x), model.attn.key(x))
        return np.asarray(weights)

    def hook_state(self, case: Case) -> Any:
        """The ``__call__`` of every class the model's modules use, the functions the
        attention taps wrap, the capture key JAX compiles under, and the model's graph (which
        holds the outbox Variable while attached)."""
        from jax._src import config

        from layerscope.backends import jax as backend

        classes = {type(m) for _, m in nnx.iter_graph(case.model) if isinstance(m, nnx.Module)}
        calls = sorted((f"{k.__module__}.{k.__qualname__}", id(k.__dict__["__call__"]))
                       for cls in classes for k in cls.__mro__ if "__call__" in k.__dict__)
        from jax._src.nn import functions as jax_functions

        functions = {name: id(value) for name, value in (
            ("jax.nn.softmax", jax.nn.softmax), ("flax.nnx.softmax", nnx.softmax),
            ("jax.nn.dot_product_attention", jax.nn.dot_product_attention),
            ("xla attention", jax_functions._dot_product_attention_xla),
            ("xla softmax", jax_functions.softmax))}
        key = config.config_states["layerscope_capture"].value
        return calls, functions, key, dict(backend._functions), nnx.graphdef(case.model)

    @contextmanager
    def failing(self, case: Case, error: BaseException) -> Iterator[None]:
        """Swap the model's last layer for one that raises."""
        model = case.model
        name = [k for k, v in vars(model).items() if isinstance(v, nnx.Module)][-1]
        layer = getattr(model, name)
        setattr(model, name, Exploding(error))
        try:
            yield
        finally:
            setattr(model, name, layer)


_jitted_call = nnx.jit(lambda model, x: model(x))


@nnx.jit
def _jitted_intermediates(model: nnx.Module, x: jax.Array) -> dict[str, Any]:
    keep: dict[str, Any] = {}
    model(x, keep=keep)
    return keep


class JaxJitKit(JaxKit):
    """The same models, called through ``nnx.jit`` (captures leave the compiled call)."""

    def call(self, model: nnx.Module, x: jax.Array) -> Any:
        return _jitted_call(model, x)

    def intermediates(self, model: nnx.Module, x: jax.Array) -> dict[str, Any]:
        return _jitted_intermediates(model, x)
