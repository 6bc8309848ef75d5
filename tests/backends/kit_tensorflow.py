"""Tiny Keras 3 models for the backend conformance suite: a Sequential MLP and CNN, a
subclassed transformer (MultiHeadAttention) and a functional RNN (GRU + LSTM). Backend-neutral:
the same kit runs on whichever backend Keras runs on in the process (``KERAS_BACKEND``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from layerscope.backends._keras_tree import named_layers
from layerscope.testing import Case, Kit


class TinyTransformer(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="tiny_transformer")
        self.embed = keras.layers.Embedding(20, 16, name="embed")
        self.attn = keras.layers.MultiHeadAttention(2, 8, name="attn")
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.mlp = keras.Sequential([keras.layers.Dense(32, activation="gelu", name="fc1"),
                                     keras.layers.Dense(16, name="fc2")], name="mlp")

    def call(self, ids: Any) -> Any:
        x = self.embed(ids)
        x = self.norm(x + self.attn(x, x))
        return x + self.mlp(x)


def _sequential_mlp() -> keras.Model:
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, name="fc1"), keras.layers.ReLU(name="act"),
        keras.layers.Dense(3, name="fc2"),
    ], name="mlp")


def _sequential_cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.ReLU(name="act"), keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(5, name="fc"),
    ], name="cnn")


def _functional_rnn() -> keras.Model:
    inputs = keras.Input((6, 4), name="steps")
    x = keras.layers.GRU(6, return_sequences=True, name="gru")(inputs)
    x = keras.layers.LSTM(5, name="lstm")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="rnn")


class TensorFlowKit(Kit):
    #: the Keras backend's name in this process: keras/tensorflow, keras/jax or keras/torch
    framework = f"keras/{keras.backend.backend()}"

    def build(self, kind: str) -> Case:
        keras.utils.set_random_seed(0)
        if kind == "mlp":
            hidden = ("batch", "hidden")
            return Case(_sequential_mlp(), {"fc1": hidden, "act": hidden, "fc2": hidden},
                        batch_size=5, extra={"shape": (4,)})
        if kind == "transformer":
            model = TinyTransformer()
            model(np.zeros((1, 7), np.int64))  # build the weights
            roles = ("batch", "token", "hidden")
            sites = {"embed": roles, "attn": roles, "norm": roles, "mlp.fc1": roles, "mlp": roles}
            return Case(model, sites, batch_size=3, attention_site="attn",
                        extra={"reference": _transformer_reference})
        if kind == "cnn":
            image = ("batch", "height", "width", "channel")
            sites = {"conv": image, "act": image, "pool": image, "fc": ("batch", "hidden")}
            return Case(_sequential_cnn(), sites, batch_size=4, extra={"shape": (8, 8, 1)})
        if kind == "rnn":
            sites = {"gru": ("batch", "token", "hidden"), "lstm": ("batch", "hidden"),
                     "head": ("batch", "hidden")}
            return Case(_functional_rnn(), sites, batch_size=2, extra={"shape": (6, 4)})
        raise ValueError(kind)

    def inputs(self, case: Case, batch: int) -> np.ndarray:
        rng = np.random.default_rng(batch)
        if isinstance(case.model, TinyTransformer):
            return rng.integers(0, 20, (case.batch_size, 7))
        return rng.standard_normal((case.batch_size, *case.extra["shape"])).astype(np.float32)

    def array_input(self, case: Case, batch: int) -> np.ndarray:
        return self.inputs(case, batch)

    def run(self, case: Case, batch: int) -> None:
        case.model(self.inputs(case, batch))

    def reference(self, case: Case, batch: int, site: str) -> np.ndarray:
        """What the layer at ``site`` returns, computed by Keras alone: a functional model
        ending at that layer's output, or (subclassed models) the layers called one by one."""
        x = self.inputs(case, batch)
        custom: Callable[..., dict[str, Any]] | None = case.extra.get("reference")
        if custom is not None:
            return np.asarray(custom(case.model, x)[site])
        model = case.model
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        probe = keras.Model(inputs, model.get_layer(site).output)
        return keras.ops.convert_to_numpy(probe(x))

    def reference_attention(self, case: Case, batch: int) -> np.ndarray:
        model = case.model
        x = model.embed(self.inputs(case, batch))
        _, scores = model.attn(x, x, return_attention_scores=True)
        return keras.ops.convert_to_numpy(scores)

    def hook_state(self, case: Case) -> Any:
        model = case.model
        return (
            [(path, "call" in vars(layer), "_compute_attention" in vars(layer), layer.call)
             for path, layer in named_layers(model)],
            [getattr(model, name, None) for name in
             ("predict_function", "test_function", "train_function", "_jit_compile")],
        )

    @contextmanager
    def failing(self, case: Case, error: BaseException) -> Iterator[None]:
        last = case.model.layers[-1]
        had = "call" in vars(last)
        previous = vars(last).get("call")

        def explode(*args: Any, **kwargs: Any) -> Any:
            raise error

        object.__setattr__(last, "call", explode)
        try:
            yield
        finally:
            if had:
                object.__setattr__(last, "call", previous)
            else:
                object.__delattr__(last, "call")


def _transformer_reference(model: TinyTransformer, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every site of the tiny transformer, from its layers called one by one."""
    embedded = model.embed(ids)
    attended = model.attn(embedded, embedded)
    normed = model.norm(embedded + attended)
    inner = model.mlp.get_layer("fc1")(normed)
    mlp = model.mlp.get_layer("fc2")(inner)
    values = {"embed": embedded, "attn": attended, "norm": normed, "mlp.fc1": inner, "mlp": mlp}
    return {k: keras.ops.convert_to_numpy(v) for k, v in values.items()}
