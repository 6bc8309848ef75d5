"""The probe leaves the model as it found it. A model in training mode changes itself when it
runs (BatchNorm's running statistics, the random numbers dropout draws), so the trace that
follows an estimate would otherwise differ from a run without one. Restored here: a PyTorch
module's buffers and the random generators' states, and a Flax NNX module's whole state
(its batch statistics and RNG counters included). Keras models run in inference mode unless
told otherwise, and there change nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def model_state_kept(model: Any) -> Iterator[None]:
    restore = _torch_state(model) or _nnx_state(model)
    try:
        yield
    finally:
        if restore is not None:
            restore()


def _torch_state(model: Any) -> Callable[[], None] | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return None
    training = any(module.training for module in model.modules())
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()} \
        if training else {}
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore() -> None:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore


def _nnx_state(model: Any) -> Callable[[], None] | None:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(model, nnx.Module):
        return None
    import jax

    kept = jax.tree.map(lambda value: value, nnx.state(model))  # values: jax arrays do not change

    def restore() -> None:
        nnx.update(model, kept)

    return restore
