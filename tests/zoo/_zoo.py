"""Shared checks for the model zoo: what every trace of a real model family must satisfy."""

from __future__ import annotations

from typing import Any

import numpy as np

from layerscope.core.naming import parse_variable_name, roles_of

IMAGE_ROLES = {"channel", "height", "width", "depth"}
ATTENTION_ROLES = ("batch", "head", "query", "key")


def captures(ds: Any) -> dict[str, Any]:
    """Captured variables of a trace by name (coordinates left out)."""
    return {str(name): ds[name] for name in ds.data_vars if "@" in str(name)}


def attention_variables(ds: Any) -> dict[str, Any]:
    return {name: var for name, var in captures(ds).items()
            if parse_variable_name(name).kind.startswith("attention")}


def assert_is_attention(var: Any, reference: Any, name: str) -> None:
    """``var`` holds ``reference`` (the framework's own probabilities), labeled and
    normalised as attention."""
    assert roles_of(var) == ATTENTION_ROLES, (name, roles_of(var))
    values = var.values
    np.testing.assert_allclose(values, np.asarray(reference), rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(values.sum(-1), 1.0, rtol=0, atol=1e-5, err_msg=name)


def assert_no_image_roles(ds: Any) -> None:
    """No variable of a model without convolutions is labeled channel/height/width."""
    wrong = {name: roles_of(var) for name, var in captures(ds).items()
             if IMAGE_ROLES & set(roles_of(var))}
    assert not wrong, wrong


def assert_lines_up(var: Any, reference: Any, roles: tuple[str, ...], name: str,
                    exact: bool = True) -> None:
    """``var`` holds ``reference``, whose axes play ``roles``, in whatever order its axes were
    stored (a channels-last map against a channels-first reference): the same roles, and
    the same values once lined up by role (bit for bit unless ``exact`` is False)."""
    stored = roles_of(var)
    assert sorted(stored) == sorted(roles), (name, stored, roles)
    lined_up = np.transpose(np.asarray(var.values), [stored.index(role) for role in roles])
    if exact:
        np.testing.assert_array_equal(lined_up, np.asarray(reference), err_msg=name)
    else:
        np.testing.assert_allclose(lined_up, np.asarray(reference), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def assert_same_variables(ds: Any, reference: Any) -> None:
    """Two traces of one model (run eagerly and compiled) hold the same variables, with the
    same dims, roles and attributes (the execution order aside)."""
    ours, theirs = captures(ds), captures(reference)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for name, var in ours.items():
        other = theirs[name]
        assert var.dims == other.dims, (name, var.dims, other.dims)
        assert var.shape == other.shape, (name, var.shape, other.shape)
        assert roles_of(var) == roles_of(other), name
        labels = {k: v for k, v in var.attrs.items() if k != "order"}
        assert labels == {k: v for k, v in other.attrs.items() if k != "order"}, name


def assert_no_channel_on_tokens(ds: Any) -> None:
    """No variable mixes token axes with image axes."""
    tokens = {"token", "query", "key"}
    wrong = {name: roles_of(var) for name, var in captures(ds).items()
             if tokens & set(roles_of(var)) and IMAGE_ROLES & set(roles_of(var))}
    assert not wrong, wrong


#: how a Flax NNX model is called inside a trace at each batch size: as it is, and compiled,
#: under nnx.jit (the model passed in) or jax.jit (the model closed over); the compiled trace
#: is checked against the eager one (one compiled mode per batch size keeps the zoo fast)
NNX_MODES = {1: ("eager", "nnx.jit"), 3: ("eager", "jax.jit")}


def trace_nnx(model: Any, args: tuple[Any, ...], path: Any, mode: str,
              kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
    """Trace one call of the Flax NNX ``model`` on ``args`` (and keyword ``kwargs``) run as
    ``mode`` says; the opened trace and what the model returned."""
    import jax
    from flax import nnx

    import layerscope

    if mode == "eager":
        call = model
    elif mode == "nnx.jit":
        compiled = nnx.jit(lambda m, *a, **k: m(*a, **k))

        def call(*a: Any, **k: Any) -> Any:
            return compiled(model, *a, **k)
    elif mode == "jax.jit":
        call = jax.jit(lambda *a, **k: model(*a, **k))
    else:
        raise ValueError(mode)
    with layerscope.trace(model, path, **options):
        out = jax.block_until_ready(call(*args, **(kwargs or {})))
    return layerscope.open_trace(path), out



# -- Keras 3 (any backend): the framework's own values, from an untraced run ---------------

TOKEN_HIDDEN = ("batch", "token", "hidden")
TOKEN_NEURON = ("batch", "token", "neuron")
KERAS_IMAGE = ("batch", "height", "width", "channel")  # Keras' NHWC, as stored


def keras_layers(model: Any) -> dict[str, Any]:
    """site -> layer for every layer of a Keras model (the paths ``layerscope.sites`` lists)."""
    from layerscope.backends._keras_tree import named_layers, site_of

    return {site_of(path): layer for path, layer in named_layers(model)}


class KerasSpy:
    """``with KerasSpy(layers, method) as seen:`` every call of ``layer.<method>`` (replaced
    by an instance attribute over the class's method) appends what it returns (the first
    element of a tuple) to ``seen[site]``, as NumPy. Used on a run outside any trace: what
    the layers return by themselves."""

    def __init__(self, layers: dict[str, Any], method: str = "call") -> None:
        self.layers, self.method = layers, method
        self.seen: dict[str, list[Any]] = {site: [] for site in layers}

    def _spy(self, site: str, original: Any) -> Any:
        import keras

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            first = result[0] if isinstance(result, tuple) else result
            self.seen[site].append(keras.ops.convert_to_numpy(first))
            return result

        return wrapper

    def __enter__(self) -> dict[str, list[Any]]:
        for site, layer in self.layers.items():
            assert self.method not in vars(layer), f"{site}.{self.method} is already replaced"
            object.__setattr__(layer, self.method, self._spy(site, getattr(layer, self.method)))
        return self.seen

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers.values():
            if self.method in vars(layer):
                object.__delattr__(layer, self.method)


def keras_attention_sites(ds: Any) -> dict[str, Any]:
    """site -> attention variable of a trace."""
    return {name.split("@")[0]: var for name, var in attention_variables(ds).items()}


def assert_same(var: Any, reference: Any, name: str) -> None:
    """Bit for bit: nothing was converted between the layer and the store."""
    np.testing.assert_array_equal(var.values, np.asarray(reference), err_msg=name)


def assert_close_compiled(actual: Any, desired: Any, err_msg: str = "") -> None:
    """A compiled forward may fuse and reorder float operations."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5, err_msg=err_msg)
