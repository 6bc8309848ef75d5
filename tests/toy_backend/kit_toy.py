"""Tiny toynn models for layerscope's conformance suite: the kit a third party writes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import toynn

from layerscope.testing import Case, Kit

Keep = dict[str, Any] | None


def _keep(keep: Keep, site: str, value: np.ndarray) -> np.ndarray:
    if keep is not None:
        keep[site] = value.copy()
    return value


class TinyTransformer(toynn.Module):
    hidden_size = 16  # the model width: the MLP's 32-wide inner layer is ``neuron``

    def __init__(self, rng: np.random.Generator) -> None:
        self.embed = toynn.Embedding(20, 16, rng)
        self.attn = toynn.SelfAttention(16, 2, rng)
        self.norm = toynn.LayerNorm(16)
        self.mlp = toynn.Sequential(toynn.Linear(16, 32, rng), toynn.ReLU(),
                                    toynn.Linear(32, 16, rng))

    def __call__(self, ids: np.ndarray, keep: Keep = None) -> np.ndarray:
        x = _keep(keep, "embed", self.embed(ids))
        x = _keep(keep, "norm", self.norm(x + _keep(keep, "attn", self.attn(x))))
        if keep is not None:
            _keep(keep, "mlp.0", self.mlp.layers[0](x))
        return x + _keep(keep, "mlp", self.mlp(x))


class TinyRNN(toynn.Module):
    def __init__(self, rng: np.random.Generator) -> None:
        self.rnn = toynn.RNN(4, 6, rng)
        self.tm = toynn.RNN(6, 5, rng, time_major=True)  # (token, batch, hidden)
        self.head = toynn.Linear(5, 3, rng)

    def __call__(self, x: np.ndarray, keep: Keep = None) -> np.ndarray:
        steps = _keep(keep, "rnn", self.rnn(x))
        steps = self.tm(steps.transpose(1, 0, 2))
        _keep(keep, "tm", steps.transpose(1, 0, 2))  # stored batch first
        return _keep(keep, "head", self.head(steps[-1]))


class Exploding(toynn.Module):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, *args: Any) -> Any:
        raise self.error


class ToyKit(Kit):
    framework = "numpy"

    def build(self, kind: str) -> Case:
        rng = np.random.default_rng(0)
        if kind == "mlp":
            # the in-place ReLU overwrites fc1's output: captures must be snapshots
            model = toynn.Sequential(toynn.Linear(4, 8, rng), toynn.ReLU(inplace=True),
                                     toynn.Linear(8, 3, rng))
            hidden = ("batch", "hidden")
            return Case(model, {"0": hidden, "1": hidden, "2": hidden}, batch_size=5)
        if kind == "transformer":
            seq = ("batch", "token", "hidden")
            sites = {"embed": seq, "attn": seq, "norm": seq,
                     "mlp.0": ("batch", "token", "neuron"), "mlp": seq}
            return Case(TinyTransformer(rng), sites, batch_size=3, attention_site="attn")
        if kind == "cnn":
            model = toynn.Sequential(toynn.Conv2d(1, 4, 3, rng), toynn.ReLU(), toynn.MaxPool2d(2),
                                     toynn.Flatten(), toynn.Linear(36, 5, rng))
            image = ("batch", "channel", "height", "width")
            return Case(model, {"0": image, "1": image, "2": image, "4": ("batch", "hidden")},
                        batch_size=4)
        if kind == "rnn":
            seq = ("batch", "token", "hidden")
            return Case(TinyRNN(rng), {"rnn": seq, "tm": seq, "head": ("batch", "hidden")},
                        batch_size=2)
        raise ValueError(kind)

    def array_input(self, case: Case, batch: int) -> np.ndarray:
        rng = np.random.default_rng(batch)
        model = case.model
        if isinstance(model, TinyTransformer):
            return rng.integers(0, 20, (case.batch_size, 7))
        if isinstance(model, TinyRNN):
            return rng.standard_normal((case.batch_size, 6, 4), np.float32)
        if isinstance(model.layers[0], toynn.Conv2d):
            return rng.standard_normal((case.batch_size, 1, 8, 8), np.float32)
        return rng.standard_normal((case.batch_size, 4), np.float32)

    def run(self, case: Case, batch: int) -> None:
        case.model(self.array_input(case, batch))

    def reference(self, case: Case, batch: int, site: str) -> np.ndarray:
        x = self.array_input(case, batch)
        model = case.model
        if isinstance(model, toynn.Sequential):  # the layers one by one
            keep = {}
            for index, layer in enumerate(model.layers):
                x = layer(x)
                keep[str(index)] = x.copy()
            return keep[site]
        keep = {}
        model(x, keep=keep)
        return keep[site]

    def reference_attention(self, case: Case, batch: int) -> np.ndarray:
        model = case.model
        _, weights = model.attn(model.embed(self.array_input(case, batch)), return_weights=True)
        return weights

    def hook_state(self, case: Case) -> Any:
        """The ``__call__`` of every class the model's modules use, and their attributes."""
        classes = {k for _, m in case.model.named_modules() for k in type(m).__mro__}
        calls = sorted((f"{k.__module__}.{k.__qualname__}", id(k.__dict__["__call__"]))
                       for k in classes if "__call__" in k.__dict__)
        attributes = [(path, sorted(vars(m))) for path, m in case.model.named_modules()]
        return calls, attributes

    @contextmanager
    def failing(self, case: Case, error: BaseException) -> Iterator[None]:
        """Swap the model's last layer for one that raises."""
        model = case.model
        if isinstance(model, toynn.Sequential):
            last = model.layers[-1]
            model.layers[-1] = Exploding(error)
            try:
                yield
            finally:
                model.layers[-1] = last
            return
        name = [k for k, v in vars(model).items() if isinstance(v, toynn.Module)][-1]
        layer = getattr(model, name)
        setattr(model, name, Exploding(error))
        try:
            yield
        finally:
            setattr(model, name, layer)
