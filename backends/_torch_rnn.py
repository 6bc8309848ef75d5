"""Inputs handed over time-major, (token, batch), as in PyTorch's word language model.

The backend takes the first axis of the root's input as the batch. A model that takes its ids
(or embeddings) as (token, batch) and feeds them straight to a time-major layer would be
stored with tokens as samples: every label wrong, silently. The layer itself says where its
batch is (``batch_first=False``), so while attached each time-major ``nn.RNN``/``GRU``/
``LSTM``, ``nn.MultiheadAttention`` and ``nn.Transformer*`` layer checks its input against
the root's and the pass stops with a :class:`CaptureError` saying what to change. (When the
two lengths are equal the layouts cannot be told apart.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerscope.core.errors import CaptureError

_TIME_MAJOR = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder,
               nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _is_time_major(module: nn.Module) -> bool:
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return not getattr(module.layers[0], "batch_first", True) if len(module.layers) else False
    return isinstance(module, _TIME_MAJOR) and getattr(module, "batch_first", True) is False


class TimeMajorIds:
    """Hooks that refuse a pass whose root input reaches a time-major layer as
    (token, batch)."""

    def __init__(self) -> None:
        self.ids_shape: tuple[int, ...] | None = None

    def install(self, model: nn.Module) -> list[Any]:
        """The hooks' handles; none for a model without a time-major layer inside it."""
        rnns = [(path, m) for path, m in model.named_modules()
                if _is_time_major(m) and m is not model]
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
        if isinstance(ids, torch.Tensor) and ids.dim() in (2, 3):  # ids, or embeddings
            self.ids_shape = tuple(ids.shape[:2])

    def _check(self, site: str, args: tuple[Any, ...]) -> None:
        steps = args[0] if args else None
        if self.ids_shape is None or not isinstance(steps, torch.Tensor) or steps.dim() != 3:
            return
        tokens, batch = self.ids_shape
        if tokens != batch and tuple(steps.shape[:2]) == (tokens, batch):
            raise CaptureError(
                f"the model's input {tuple(self.ids_shape)} reaches the time-major layer "
                f"{site!r} (batch_first=False) as (token, batch), but layerscope reads the "
                f"first axis of the input as the batch ({tokens} samples); pass the input as "
                "(batch, token) and transpose it inside forward, or build the layer with "
                "batch_first=True"
            )
