"""Token ids handed over time-major, (token, batch), as in PyTorch's word language model.

The backend takes the first axis of the root's token ids as the batch. A model that takes its
ids as (token, batch) and feeds their embeddings straight to a time-major RNN would be stored
with tokens as samples: every label wrong, silently. The RNN itself says where its batch is,
so while attached each time-major ``nn.RNN``/``GRU``/``LSTM`` checks its input against the
root's ids and the pass stops with a :class:`CaptureError` saying what to change. (When the
two lengths are equal the layouts cannot be told apart.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerscope.core.errors import CaptureError


class TimeMajorIds:
    """Hooks that refuse a pass whose root ids reach a time-major RNN as (token, batch)."""

    def __init__(self) -> None:
        self.ids_shape: tuple[int, ...] | None = None

    def install(self, model: nn.Module) -> list[Any]:
        """The hooks' handles; none for a model without a time-major RNN inside it."""
        rnns = [(path, m) for path, m in model.named_modules()
                if isinstance(m, nn.RNNBase) and not m.batch_first and m is not model]
        if not rnns:
            return []
        handles = [model.register_forward_pre_hook(self._root, with_kwargs=True)]
        for path, rnn in rnns:
            handles.append(rnn.register_forward_pre_hook(
                lambda m, args, site=path: self._check(site, args)))
        return handles

    def _root(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids_shape = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            self.ids_shape = tuple(ids.shape)

    def _check(self, site: str, args: tuple[Any, ...]) -> None:
        steps = args[0] if args else None
        if self.ids_shape is None or not isinstance(steps, torch.Tensor) or steps.dim() != 3:
            return
        tokens, batch = self.ids_shape
        if tokens != batch and tuple(steps.shape[:2]) == (tokens, batch):
            raise CaptureError(
                f"the model's token ids {tuple(self.ids_shape)} reach the time-major RNN "
                f"{site!r} as (token, batch), but layerscope reads the first axis of the ids "
                f"as the batch ({tokens} samples); pass the ids as (batch, token) and "
                "transpose them inside forward"
            )
