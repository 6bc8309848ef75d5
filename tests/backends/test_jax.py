"""JAX backend: NNX paths and jit, Linen scope paths, plain functions by named scope,
attention probabilities, restoration after failures. References come from JAX/Flax itself."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights

import layerscope
from layerscope.backends import detect, get_backend

from .kit_jax import JaxKit

# -- models --------------------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                                rngs=rngs)
        self.mlp = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(x)
        return x + nnx.relu(self.mlp(x))


class Stack(nnx.Module):
    """Numbered blocks (``layers.3.attention``) like a transformer encoder."""

    calls = 0  # how often Python ran __call__: once per trace under jit

    def __init__(self, depth: int = 4) -> None:
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(depth)])

    def __call__(self, ids: jax.Array) -> jax.Array:
        type(self).calls += 1
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def token_batch(seed: int, batch: int = 3, length: int = 5) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 10, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def stack() -> Stack:
    return Stack()


def block_outputs(model: Stack, ids: jax.Array) -> tuple[list[Any], list[Any], list[Any]]:
    """Each block's output, its attention output and its attention probabilities, by Flax."""
    x = model.embed(ids)
    outs, attn_outs, probs = [], [], []
    for layer in model.layers:
        attn = layer.attention
        probs.append(dot_product_attention_weights(attn.query(x), attn.key(x)))
        attn_outs.append(attn(x))
        x = layer(x)
        outs.append(x)
    return outs, attn_outs, probs


# -- NNX -----------------------------------------------------------------------------------------


def test_nnx_sites_are_graph_paths(stack: Stack) -> None:
    sites = {s.path: s for s in layerscope.sites(stack)}
    assert "layers.3.attention" in sites and "layers.3.attention.query" in sites
    assert sites["layers.3.attention"].is_attention
    assert not sites["layers.3"].is_attention
    assert sites["layers.3.mlp"].module_type == "Linear"
    assert "layers" not in sites  # the nnx.List container is never called


@pytest.mark.parametrize("mode", ["eager", "nnx.jit", "jax.jit"])
def test_nnx_paths_attention_and_values(stack: Stack, mode: str, tmp_path: Path) -> None:
    calls = {
        "eager": lambda ids: stack(ids),
        "nnx.jit": functools.partial(nnx.jit(lambda m, ids: m(ids)), stack),
        "jax.jit": jax.jit(lambda ids: stack(ids)),
    }
    run = calls[mode]
    path = tmp_path / "stack.zarr"
    with layerscope.trace(stack, path, capture=["layers.*.attention", "layers.[13]"]):
        for seed in range(2):
            run(token_batch(seed))
    ds = layerscope.open_trace(path)
    assert set(layerscope.captured_names(ds)) == {
        f"layers.{i}.attention@{k}" for i in range(4) for k in ("output", "attention")
    } | {"layers.1@output", "layers.3@output"}
    probs = ds["layers.3.attention@attention"]
    assert probs.dims == ("batch", "head", "query", "key")
    assert probs.attrs["layer"] == 3 and probs.attrs["module_type"] == "MultiHeadAttention"
    for seed in range(2):
        rows = slice(3 * seed, 3 * seed + 3)
        outs, attn_outs, weights = block_outputs(stack, token_batch(seed))
        exact = np.testing.assert_array_equal if mode == "eager" else functools.partial(
            np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
        exact(ds["layers.1@output"].isel(batch=rows).values, outs[1])
        exact(ds["layers.3.attention@output"].isel(batch=rows).values, attn_outs[3])
        np.testing.assert_allclose(probs.isel(batch=rows).values, weights[3], rtol=1e-6,
                                   atol=1e-6)


def test_jit_stays_compiled(tmp_path: Path) -> None:
    """Under jit the model's Python code runs once (tracing); later batches only run the
    compiled computation, whose callback hands the values out; results are bit-identical to
    the jitted function's own intermediate outputs."""
    model = Stack(depth=2)
    step = nnx.jit(lambda m, ids: m(ids))

    @nnx.jit
    def reference(m: Stack, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = m.embed(ids)
        first = m.layers[0](x)
        return first, m.layers[1](first)

    Stack.calls = 0
    path = tmp_path / "jit.zarr"
    with layerscope.trace(model, path, capture=["layers.*"]):
        for seed in range(4):
            step(model, token_batch(seed))
    assert Stack.calls == 1
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 4
    for seed in range(4):
        first, second = reference(model, token_batch(seed))
        rows = slice(3 * seed, 3 * seed + 3)
        np.testing.assert_array_equal(ds["layers.0@output"].isel(batch=rows).values, first)
        np.testing.assert_array_equal(ds["layers.1@output"].isel(batch=rows).values, second)


def _compiled_text(step: Any, *args: Any) -> str:
    return step.lower(*args).as_text()


@pytest.mark.parametrize("options", [{}, {"graph_updates": False}, {"graph": False}],
                         ids=["default", "no-graph-updates", "pytree"])
def test_nnx_jit_hands_values_out_as_outputs(tmp_path: Path, options: dict[str, Any]) -> None:
    """Directly under ``nnx.jit`` the values leave as outputs through the model's state: the
    compiled computation has no host callback, the model is called twice in one compiled
    function and both passes arrive in order, bit for bit, and the model's state is as before
    once the block ends."""
    model = Stack(depth=1)
    before = nnx.state(model)
    step = nnx.jit(lambda m, a, b: (m(a), m(b)), **options)
    path = tmp_path / "outputs.zarr"
    with layerscope.trace(model, path, capture=["layers.0"]):
        assert "callback" not in _compiled_text(step, model, token_batch(0), token_batch(1))
        for seed in range(0, 4, 2):
            step(model, token_batch(seed), token_batch(seed + 1))
        assert "callback" in _compiled_text(  # the same model under plain jax.jit
            jax.jit(lambda a: model(a)), token_batch(0))
    assert not hasattr(model, "layerscope_outbox")
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(before)
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 4
    for seed in range(4):
        expected = model.layers[0](model.embed(token_batch(seed)))
        rows = slice(3 * seed, 3 * seed + 3)
        np.testing.assert_array_equal(ds["layers.0@output"].isel(batch=rows).values, expected)


def test_nnx_model_under_plain_jit_keeps_the_callback(tmp_path: Path) -> None:
    """A model merged inside plain ``jax.jit`` cannot hand state back: every pass still
    arrives, through the host callback."""
    model = Stack(depth=1)
    path = tmp_path / "merged.zarr"
    with layerscope.trace(model, path, capture=["layers.0"]):
        graph, state = nnx.split(model)
        step = jax.jit(lambda state, ids: nnx.merge(graph, state)(ids))
        assert "callback" in _compiled_text(step, state, token_batch(0))
        for seed in range(3):
            step(state, token_batch(seed))
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 3
    expected = model.layers[0](model.embed(token_batch(2)))
    np.testing.assert_array_equal(ds["layers.0@output"].isel(batch=slice(6, 9)).values,
                                  expected)


def test_compiled_before_and_after_a_trace(tmp_path: Path) -> None:
    """A function compiled before the trace still captures inside it; after the block the
    uncaptured compilation runs again and nothing reaches the closed store."""
    model = Stack(depth=1)
    step = jax.jit(lambda ids: model(ids))
    before = step(token_batch(0))
    path = tmp_path / "cache.zarr"
    with layerscope.trace(model, path, capture=["layers.0"]):
        inside = step(token_batch(0))
    after = step(token_batch(0))
    np.testing.assert_array_equal(before, inside)
    np.testing.assert_array_equal(before, after)
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 1
    # a second block with the same selection reuses the compiled function and captures again
    with layerscope.trace(model, path, capture=["layers.0"], mode="a"):
        step(token_batch(1))
    assert layerscope.open_trace(path).attrs["committed_batches"] == 2


def test_inputs_and_bfloat16(tmp_path: Path) -> None:
    rngs = nnx.Rngs(0)
    layer = nnx.Linear(4, 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4)), jnp.bfloat16)
    path = tmp_path / "bf16.zarr"
    with layerscope.trace(layer, path, kinds=["input", "output"]):
        out = layer(x)
    ds = layerscope.open_trace(path)
    assert ds["root@output"].dtype == np.float32
    np.testing.assert_array_equal(ds["root@output"].values, np.asarray(out, np.float32))
    np.testing.assert_array_equal(ds["root@input"].values, np.asarray(x, np.float32))


def test_jit_error_in_callback_surfaces(tmp_path: Path, monkeypatch: Any) -> None:
    """A pass the writer refuses inside a jitted computation's host callback is reported when
    the block ends."""
    from layerscope.core import CaptureError
    from layerscope.core.writer import TraceWriter

    original, seen = TraceWriter.put, []

    def refusing_the_second_pass(self: Any, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "layers.0@output":
            seen.append(name)
            if len(seen) == 2:
                raise CaptureError("the writer refused this pass")
        original(self, name, *args, **kwargs)

    monkeypatch.setattr(TraceWriter, "put", refusing_the_second_pass)
    model = Stack(depth=1)
    step = nnx.jit(lambda m, ids: m(ids))
    with pytest.raises(layerscope.LayerscopeError, match="the writer refused this pass"):
        with layerscope.trace(model, tmp_path / "err.zarr", capture=["layers.0"]):
            step(model, token_batch(0))
            step(model, token_batch(1))
    assert len(seen) == 2


def test_jit_passes_of_different_lengths_grow_the_store(tmp_path: Path) -> None:
    model = Stack(depth=1)
    step = nnx.jit(lambda m, ids: m(ids))
    path = tmp_path / "grow.zarr"
    with layerscope.trace(model, path, capture=["layers.0"]):
        step(model, token_batch(0, length=5))
        step(model, token_batch(1, length=6))
    ds = layerscope.open_trace(path)
    assert ds.sizes["token"] == 6 and ds.sizes["batch"] == 6
    values = ds["layers.0@output"].values
    assert np.isnan(values[:3, 5:]).all()
    np.testing.assert_array_equal(ds["token_mask"].values[:3, 5], False)
    np.testing.assert_array_equal(values[3:], np.asarray(model.layers[0](
        model.embed(token_batch(1, length=6)))))


def test_restored_after_keyboard_interrupt_under_jit(tmp_path: Path) -> None:
    kit = JaxKit()
    case = kit.build("transformer")
    before = kit.hook_state(case)
    step = nnx.jit(lambda m, ids: m(ids))
    with pytest.raises(KeyboardInterrupt):
        with layerscope.trace(case.model, tmp_path / "kbi.zarr"):
            step(case.model, kit.inputs(case, 0))
            raise KeyboardInterrupt
    assert kit.hook_state(case) == before
    with pytest.warns(UserWarning, match="aborted"):
        ds = layerscope.open_trace(tmp_path / "kbi.zarr")
    assert ds.attrs["committed_batches"] == 1  # the finished compiled pass was kept


# -- Linen ---------------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.Dense(8)(x))


class LinenModel(nn.Module):
    def setup(self) -> None:
        self.layers = [LinenBlock() for _ in range(2)]
        self.attn = nn.MultiHeadDotProductAttention(num_heads=2)
        self.out = nn.Dense(3)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.out(self.attn(x))


@pytest.fixture(scope="module")
def linen_model() -> tuple[LinenModel, Any]:
    model = LinenModel()
    return model, model.init(jax.random.key(0), features(0))


def features(seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((2, 5, 8)), jnp.float32)


def linen_reference(model: LinenModel, variables: Any, x: jax.Array) -> dict[str, Any]:
    """Every module's return value and the attention weights, as Flax records them."""
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    found: dict[str, Any] = {}

    def walk(tree: Any, path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if key == "__call__":
                found[".".join(path) or "root"] = value[0]
            else:
                walk(value, (*path, key))

    walk(state["intermediates"], ())
    _, sown = model.apply(variables, x, mutable=["intermediates"],
                          method=lambda m, x: m.attn(m.layers[1](m.layers[0](x)),
                                                     sow_weights=True))
    found["attn@attention"] = sown["intermediates"]["attn"]["attention_weights"][0]
    return found


def test_linen_sites(linen_model: tuple[LinenModel, Any]) -> None:
    model, _ = linen_model
    assert [s.path for s in layerscope.sites(model)] == ["root", "layers_0", "layers_1", "attn",
                                                         "out"]
    assert {s.path for s in layerscope.sites(model) if s.is_attention} == {"attn"}


@pytest.mark.parametrize("mode", ["apply", "jit", "bound"])
def test_linen_scope_paths_and_values(linen_model: tuple[LinenModel, Any], mode: str,
                                      tmp_path: Path) -> None:
    model, variables = linen_model
    path = tmp_path / "linen.zarr"
    with layerscope.trace(model if mode != "bound" else model.bind(variables), path) as t:
        for seed in range(2):
            if mode == "apply":
                model.apply(variables, features(seed))
            elif mode == "jit":
                jax.jit(model.apply)(variables, features(seed))
            else:
                t(np.asarray(features(seed)))  # a bound module is called directly
        model.init(jax.random.key(1), features(0))  # init inside the block records nothing
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 2
    names = layerscope.captured_names(ds)
    assert "layers_0.Dense_0@output" in names and "attn.query@output" in names
    assert ds["attn@attention"].dims == ("batch", "head", "query", "key")
    assert ds["attn@attention"].attrs["attention"] == "self"
    assert ds["attn.query@output"].attrs["roles"] == ["batch", "token", "head", "axis3"]
    for seed in range(2):
        reference = linen_reference(model, variables, features(seed))
        rows = slice(2 * seed, 2 * seed + 2)
        for name in names:
            site, kind = name.split("@")
            expected = reference[name if kind == "attention" else site]
            if mode == "jit" or kind == "attention":
                np.testing.assert_allclose(ds[name].isel(batch=rows).values, expected,
                                           rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(ds[name].isel(batch=rows).values, expected,
                                              err_msg=name)


def test_linen_interceptor_removed_after_exception(linen_model: tuple[LinenModel, Any],
                                                   tmp_path: Path) -> None:
    model, variables = linen_model
    seen: list[str] = []

    def spy(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        seen.append(context.method_name)
        return next_fun(*args, **kwargs)

    with pytest.raises(ValueError, match="boom"):
        with layerscope.trace(model, tmp_path / "fail.zarr"):
            model.apply(variables, features(0))
            raise ValueError("boom")
    with nn.intercept_methods(spy):  # only this interceptor is left
        model.apply(variables, features(0))
    assert seen and jax.nn.softmax.__name__ == "softmax"
    assert not hasattr(jax.nn.softmax, "__wrapped__")
    with layerscope.trace(model, tmp_path / "again.zarr", capture=["out"]):
        model.apply(variables, features(0))
    assert layerscope.captured_names(layerscope.open_trace(tmp_path / "again.zarr")) == \
        ["out@output"]


def test_linen_unbound_capture_explains(linen_model: tuple[LinenModel, Any],
                                        tmp_path: Path) -> None:
    model, _ = linen_model
    with pytest.raises(layerscope.BackendError, match="bind"):
        layerscope.capture(model, np.asarray(features(0)), tmp_path / "x.zarr")


# -- plain functions -----------------------------------------------------------------------------


def attention_block(params: dict[str, Any], x: jax.Array) -> jax.Array:
    """Self-attention written by hand; the softmax runs in a scope named ``attention``."""
    batch, length, width = x.shape
    q = (x @ params["wq"]).reshape(batch, length, 2, width // 2).transpose(0, 2, 1, 3)
    k = (x @ params["wk"]).reshape(batch, length, 2, width // 2).transpose(0, 2, 1, 3)
    with jax.named_scope("attention"):
        probs = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(width // 2))
    return (probs @ q).transpose(0, 2, 1, 3).reshape(batch, length, width)


@jax.jit
def jitted_mlp(w: jax.Array, x: jax.Array) -> jax.Array:
    with jax.named_scope("mlp"):
        return jnp.tanh(x @ w)


def hand_model(params: dict[str, Any], x: jax.Array) -> jax.Array:
    for i in range(2):
        with jax.named_scope(f"layers.{i}"):
            x = x + attention_block(params, x)
            x = x + jitted_mlp(params["w"], x)  # a jitted helper: its scopes are inlined
    with jax.named_scope("head"):
        return jnp.einsum("btd,dk->btk", x, params["head"])


def hand_reference(params: dict[str, Any], x: jax.Array) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for i in range(2):
        batch, length, width = x.shape
        q = (x @ params["wq"]).reshape(batch, length, 2, width // 2).transpose(0, 2, 1, 3)
        k = (x @ params["wk"]).reshape(batch, length, 2, width // 2).transpose(0, 2, 1, 3)
        found[f"layers.{i}.attention@attention"] = jax.nn.softmax(
            q @ k.swapaxes(-1, -2) / np.sqrt(width // 2))
        x = x + attention_block(params, x)
        found[f"layers.{i}.mlp@output"] = jitted_mlp(params["w"], x)
        x = x + found[f"layers.{i}.mlp@output"]
        found[f"layers.{i}@output"] = x
    found["head@output"] = found["root@output"] = jnp.einsum("btd,dk->btk", x, params["head"])
    return found


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {name: jnp.asarray(rng.standard_normal(shape) * 0.3, jnp.float32) for name, shape in
            (("wq", (8, 8)), ("wk", (8, 8)), ("w", (8, 8)), ("head", (8, 3)))}


def test_function_backend_detection() -> None:
    assert detect(jax.jit(hand_model)).name == "jax"
    assert get_backend("jax").can_handle(hand_model)
    assert get_backend("jax").can_handle(functools.partial(hand_model, {}))
    assert not get_backend("jax").can_handle(np.zeros(3))


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_function_named_scopes(params: dict[str, Any], jitted: bool, tmp_path: Path) -> None:
    fn = jax.jit(hand_model) if jitted else hand_model
    path = tmp_path / "fn.zarr"
    with layerscope.trace(fn, path, backend="jax") as t:
        for seed in range(2):
            out = t(params, features(seed))
            np.testing.assert_array_equal(out, fn(params, features(seed)))
    ds = layerscope.open_trace(path)
    names = layerscope.captured_names(ds)
    assert names == ["layers.0.attention@output", "layers.0.attention@attention",
                     "layers.0.mlp@output", "layers.0@output",
                     "layers.1.attention@output", "layers.1.attention@attention",
                     "layers.1.mlp@output", "layers.1@output", "head@output", "root@output"]
    assert ds["layers.1.attention@attention"].dims == ("batch", "head", "query", "key")
    assert ds["layers.1@output"].attrs["layer"] == 1
    for seed in range(2):
        reference = hand_reference(params, features(seed))
        rows = slice(2 * seed, 2 * seed + 2)
        for name, expected in reference.items():
            np.testing.assert_allclose(ds[name].isel(batch=rows).values, expected,
                                       rtol=1e-5, atol=1e-6, err_msg=name)


def test_jitted_function_compiles_once(params: dict[str, Any], tmp_path: Path) -> None:
    traced = []

    @jax.jit
    def model(p: dict[str, Any], x: jax.Array) -> jax.Array:
        traced.append(1)
        return hand_model(p, x)

    with layerscope.trace(model, tmp_path / "once.zarr", capture=["head"], backend="jax") as t:
        for seed in range(3):
            t(params, features(seed))
    assert len(traced) == 1
    assert layerscope.open_trace(tmp_path / "once.zarr").attrs["committed_batches"] == 3


def test_function_fused_attention_and_capture(params: dict[str, Any], tmp_path: Path) -> None:
    """``jax.nn.dot_product_attention`` in an ``attention`` scope: probabilities recomputed;
    ``capture()`` runs a partial with the parameters bound."""
    def fused(p: dict[str, Any], x: jax.Array) -> jax.Array:
        with jax.named_scope("self_attention"):
            q = (x @ p["wq"]).reshape(*x.shape[:2], 2, 4)
            k = (x @ p["wk"]).reshape(*x.shape[:2], 2, 4)
            return jax.nn.dot_product_attention(q, k, q).reshape(x.shape)

    x = features(0)
    ds = layerscope.capture(functools.partial(fused, params), np.asarray(x),
                            tmp_path / "fused.zarr", backend="jax")
    q = (x @ params["wq"]).reshape(2, 5, 2, 4)
    k = (x @ params["wk"]).reshape(2, 5, 2, 4)
    np.testing.assert_allclose(ds["self_attention@attention"].values,
                               dot_product_attention_weights(q, k), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds["root@output"].values, fused(params, x))


def test_function_restored_after_exception(params: dict[str, Any], tmp_path: Path) -> None:
    from layerscope.backends import jax as backend

    path = tmp_path / "fnfail.zarr"
    with pytest.raises(ZeroDivisionError):
        with layerscope.trace(hand_model, path, backend="jax") as t:
            t(params, features(0))
            raise ZeroDivisionError("stop")
    assert backend._functions == {} and not hasattr(jax.nn.softmax, "__wrapped__")
    with pytest.warns(UserWarning, match="aborted"):
        assert layerscope.open_trace(path).attrs["committed_batches"] == 1
    with layerscope.trace(hand_model, tmp_path / "ok.zarr", backend="jax") as t:
        t(params, features(1))
    assert layerscope.open_trace(tmp_path / "ok.zarr").attrs["committed_batches"] == 1


def test_function_inside_users_jit_with_bare_weights(tmp_path: Path) -> None:
    """``f(w, x)`` with a weight matrix first: the batch is the leading axis of the result;
    called inside the user's own jit, values leave through the host callback."""
    def f(w: jax.Array, x: jax.Array) -> jax.Array:
        with jax.named_scope("layers.0"):
            h = jnp.tanh(x @ w)
        return h.sum(-1)

    w = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4)), jnp.float32)
    path = tmp_path / "inner.zarr"
    with layerscope.trace(f, path, backend="jax") as t:
        out = jax.jit(lambda x: t(w, x))(x)
    ds = layerscope.open_trace(path)
    assert ds.sizes["batch"] == 2
    np.testing.assert_allclose(ds["layers.0@output"].values, jnp.tanh(x @ w), rtol=1e-6)
    np.testing.assert_array_equal(ds["root@output"].values, out)


def test_capture_leaves_fused_attention_output_unchanged(tmp_path: Path) -> None:
    """NNX attention takes the fused ``jax.nn.dot_product_attention`` path; capturing its
    probabilities must not change what it returns, eagerly or compiled, bit for bit."""
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 8)), jnp.float32)
    mask = jnp.asarray(np.random.default_rng(4).random((2, 1, 5, 5)) > 0.3)
    compiled = jax.jit(lambda x, mask: layer(x, mask=mask))
    plain, plain_jit = layer(x, mask=mask), compiled(x, mask)
    path = tmp_path / "fused.zarr"
    with layerscope.trace(layer, path):
        eager, jitted = layer(x, mask=mask), compiled(x, mask)
    np.testing.assert_array_equal(eager, plain)
    np.testing.assert_array_equal(jitted, plain_jit)
    ds = layerscope.open_trace(path)
    expected = dot_product_attention_weights(layer.query(x), layer.key(x), mask=mask)
    for rows in (slice(0, 2), slice(2, 4)):
        np.testing.assert_allclose(ds["root@attention"].isel(batch=rows).values, expected,
                                   rtol=1e-6, atol=1e-6)


class JittedCall(nnx.Module):
    def __init__(self) -> None:
        self.inner = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    @nnx.jit
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


def test_nnx_jit_decorated_call_warns_and_keeps_output(tmp_path: Path) -> None:
    """Submodules inside a model's own @nnx.jit ``__call__`` cannot be reached: say so, and
    still store the model's output."""
    model = JittedCall()
    x = jnp.ones((3, 4))
    with pytest.warns(UserWarning, match="nnx.jit"):
        with layerscope.trace(model, tmp_path / "deco.zarr"):
            out = model(x)
    ds = layerscope.open_trace(tmp_path / "deco.zarr")
    assert layerscope.captured_names(ds) == ["root@output"]
    np.testing.assert_array_equal(ds["root@output"].values, out)
