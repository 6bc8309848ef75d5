"""Tiny PyTorch models for the backend conformance suite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from layerscope.testing import Case, Kit


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + attended)
        return x + self.mlp(x)


class TinyRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 6, batch_first=True)
        self.lstm = nn.LSTM(6, 5)  # time-major: (token, batch, hidden)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.gru(x)
        steps, _ = self.lstm(steps.transpose(0, 1))
        return self.head(steps[-1])


class TorchKit(Kit):
    framework = "torch"

    def build(self, kind: str) -> Case:
        torch.manual_seed(0)
        if kind == "mlp":
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
            sites = {"0": ("batch", "hidden"), "1": ("batch", "hidden"), "2": ("batch", "hidden")}
            return Case(model.eval(), sites, batch_size=5)
        if kind == "transformer":
            model = TinyTransformer()
            roles = ("batch", "token", "hidden")
            sites = {"embed": roles, "attn": roles, "norm": roles, "mlp.0": roles, "mlp": roles}
            return Case(model.eval(), sites, batch_size=3, attention_site="attn")
        if kind == "cnn":
            model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(36, 5))
            image = ("batch", "channel", "height", "width")
            sites = {"0": image, "1": image, "2": image, "4": ("batch", "hidden")}
            return Case(model.eval(), sites, batch_size=4)
        if kind == "rnn":
            seq = ("batch", "token", "hidden")
            return Case(TinyRNN().eval(), {"gru": seq, "lstm": seq, "head": ("batch", "hidden")},
                        batch_size=2)
        raise ValueError(kind)

    def inputs(self, case: Case, batch: int) -> torch.Tensor:
        rng = np.random.default_rng(batch)
        model = case.model
        if isinstance(model, TinyTransformer):
            return torch.from_numpy(rng.integers(0, 20, (case.batch_size, 7)))
        if isinstance(model, TinyRNN):
            return torch.from_numpy(rng.standard_normal((case.batch_size, 6, 4), np.float32))
        if isinstance(model[0], nn.Conv2d):
            return torch.from_numpy(rng.standard_normal((case.batch_size, 1, 8, 8), np.float32))
        return torch.from_numpy(rng.standard_normal((case.batch_size, 4), np.float32))

    def array_input(self, case: Case, batch: int) -> np.ndarray:
        return self.inputs(case, batch).numpy()

    def run(self, case: Case, batch: int) -> None:
        with torch.no_grad():
            case.model(self.inputs(case, batch))

    def reference(self, case: Case, batch: int, site: str) -> np.ndarray:
        """Run the layers one by one and return what ``site`` itself returned."""
        seen: dict[str, Any] = {}
        modules = dict(case.model.named_modules())

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple) else output
            seen.setdefault(site, value.detach().clone())

        handle = modules[site].register_forward_hook(keep)
        try:
            self.run(case, batch)
        finally:
            handle.remove()
        value = seen[site]
        if isinstance(modules[site], nn.LSTM):
            value = value.transpose(0, 1)  # time-major module: batch first, as stored
        return value.numpy()

    def reference_attention(self, case: Case, batch: int) -> np.ndarray:
        model = case.model
        with torch.no_grad():
            x = model.embed(self.inputs(case, batch))
            _, weights = model.attn(x, x, x, need_weights=True, average_attn_weights=False)
        return weights.numpy()

    def hook_state(self, case: Case) -> Any:
        from torch.nn import functional

        return (
            [(name, len(m._forward_hooks), len(m._forward_pre_hooks),
              len(m._forward_hooks_with_kwargs), len(m._forward_pre_hooks_with_kwargs),
              vars(m).get("forward"))  # an output hook may run inside a module's forward
             for name, m in case.model.named_modules()],
            functional.scaled_dot_product_attention.__name__,
        )

    @contextmanager
    def failing(self, case: Case, error: BaseException) -> Iterator[None]:
        last = list(case.model.modules())[-1]

        def explode(module: nn.Module, args: Any) -> None:
            raise error

        handle = last.register_forward_pre_hook(explode)
        try:
            yield
        finally:
            handle.remove()
