"""toynn: a tiny neural-network "framework" in pure NumPy, for testing layerscope's backend
contract with a fourth framework. It knows nothing of layerscope.

Tensors are NumPy arrays (float32). A layer is a :class:`Module` with a ``__call__``; its
children are the Module attributes it holds (a :class:`Sequential` numbers them ``0``, ``1``,
...). Images are channels-first, (batch, channel, height, width); sequences (batch, time,
feature), or (time, batch, feature) for a time-major :class:`RNN`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__version__ = "0.1"

Array = np.ndarray


def _weights(rng: np.random.Generator, *shape: int) -> Array:
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


class Module:
    """A layer. Children: attributes holding Modules (or lists of them), in assignment order."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no __call__")

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{index}", item

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(dotted path, module) for this module (path ``prefix``) and all below it."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)


class Sequential(Module):
    def __init__(self, *layers: Module) -> None:
        self.layers = list(layers)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for index, layer in enumerate(self.layers):
            yield str(index), layer

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x


class Linear(Module):
    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator) -> None:
        self.weight = _weights(rng, n_in, n_out)
        self.bias = _weights(rng, n_out) * np.float32(0.1)

    def __call__(self, x: Array) -> Array:
        return x @ self.weight + self.bias


class ReLU(Module):
    def __init__(self, inplace: bool = False) -> None:
        self.inplace = inplace

    def __call__(self, x: Array) -> Array:
        return np.maximum(x, 0, out=x) if self.inplace else np.maximum(x, 0)


class Softmax(Module):
    def __init__(self, axis: int = -1) -> None:
        self.axis = axis

    def __call__(self, x: Array) -> Array:
        shifted = np.exp(x - x.max(axis=self.axis, keepdims=True))
        return shifted / shifted.sum(axis=self.axis, keepdims=True)


class Embedding(Module):
    def __init__(self, count: int, width: int, rng: np.random.Generator) -> None:
        self.weight = rng.standard_normal((count, width)).astype(np.float32)

    def __call__(self, ids: Array) -> Array:
        return self.weight[ids]


class LayerNorm(Module):
    def __init__(self, width: int, eps: float = 1e-5) -> None:
        self.scale = np.ones(width, np.float32)
        self.shift = np.zeros(width, np.float32)
        self.eps = np.float32(eps)

    def __call__(self, x: Array) -> Array:
        mean = x.mean(axis=-1, keepdims=True)
        var = x.var(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.scale + self.shift


class SelfAttention(Module):
    """Multi-head self-attention on (batch, token, width); ``return_weights=True`` also
    returns the probabilities, (batch, head, query, key)."""

    def __init__(self, width: int, heads: int, rng: np.random.Generator) -> None:
        self.heads = heads
        self.query = Linear(width, width, rng)
        self.key = Linear(width, width, rng)
        self.value = Linear(width, width, rng)
        self.softmax = Softmax(-1)
        self.out = Linear(width, width, rng)

    def _split(self, x: Array) -> Array:
        batch, tokens, width = x.shape
        return x.reshape(batch, tokens, self.heads, width // self.heads).transpose(0, 2, 1, 3)

    def __call__(self, x: Array, return_weights: bool = False) -> Any:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(q.shape[-1]))
        weights = self.softmax(scores)
        mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        out = self.out(mixed)
        return (out, weights) if return_weights else out


class Conv2d(Module):
    """A 'valid' convolution, stride 1, on (batch, channel, height, width)."""

    def __init__(self, c_in: int, c_out: int, size: int, rng: np.random.Generator) -> None:
        self.weight = _weights(rng, c_in * size * size, c_out).T.reshape(c_out, c_in, size, size)
        self.bias = np.zeros(c_out, np.float32)
        self.size = size

    def __call__(self, x: Array) -> Array:
        windows = np.lib.stride_tricks.sliding_window_view(x, (self.size, self.size), axis=(2, 3))
        out = np.einsum("bchwij,ocij->bohw", windows, self.weight)
        return (out + self.bias[:, None, None]).astype(np.float32)


class MaxPool2d(Module):
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: Array) -> Array:
        b, c, h, w = x.shape
        s = self.size
        return x[:, :, :h - h % s, :w - w % s].reshape(b, c, h // s, s, w // s, s).max(axis=(3, 5))


class Flatten(Module):
    def __call__(self, x: Array) -> Array:
        return x.reshape(x.shape[0], -1)


class RNN(Module):
    """An Elman RNN; returns every step's hidden state, (batch, time, hidden), or
    (time, batch, hidden) when ``time_major``."""

    def __init__(self, n_in: int, hidden_size: int, rng: np.random.Generator,
                 time_major: bool = False) -> None:
        self.hidden_size = hidden_size
        self.time_major = time_major
        self.w_in = _weights(rng, n_in, hidden_size)
        self.w_hidden = _weights(rng, hidden_size, hidden_size)
        self.bias = np.zeros(hidden_size, np.float32)

    def __call__(self, x: Array) -> Array:
        steps = x if self.time_major else x.transpose(1, 0, 2)
        h = np.zeros((steps.shape[1], self.hidden_size), np.float32)
        out = []
        for step in steps:
            h = np.tanh(step @ self.w_in + h @ self.w_hidden + self.bias)
            out.append(h)
        return np.stack(out, axis=0 if self.time_major else 1)
