"""Dimension roles of PyTorch tensors: channels-first convolutions, RNN layouts, attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerscope.core.naming import default_roles

_CHANNELS_FIRST = (
    "Conv", "ConvTranspose", "BatchNorm", "InstanceNorm", "MaxPool", "AvgPool", "AdaptiveAvgPool",
    "AdaptiveMaxPool", "LPPool", "Upsample", "PixelShuffle", "Dropout1d", "Dropout2d",
    "Dropout3d", "ZeroPad", "ReflectionPad", "ReplicationPad", "ConstantPad",
)
_SPATIAL = {3: ("width",), 4: ("height", "width"), 5: ("depth", "height", "width")}


def hidden_size_of(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def _feature_role(size: int, hidden_size: int | None) -> str:
    return "hidden" if hidden_size is None or size == hidden_size else "neuron"


def roles_for(module: nn.Module, kind: str, tensor: torch.Tensor,
              hidden_size: int | None) -> tuple[str, ...]:
    """Role names for each axis of ``tensor`` taken as ``kind`` at ``module``."""
    ndim = tensor.dim()
    if kind == "attention":
        return ("batch", "head", "query", "key")[-ndim:] if ndim >= 3 else default_roles(ndim)
    if isinstance(module, nn.RNNBase) and kind.startswith("output"):
        return _rnn_roles(module, kind, ndim)
    name = type(module).__name__
    if ndim in _SPATIAL and (ndim >= 4 or name.startswith(_CHANNELS_FIRST)):
        return ("batch", "channel", *_SPATIAL[ndim])
    if ndim == 1:
        return ("batch",)
    if ndim == 2:
        return ("batch", _feature_role(tensor.shape[-1], hidden_size))
    if ndim == 3:
        return ("batch", "token", _feature_role(tensor.shape[-1], hidden_size))
    return default_roles(ndim)


def _rnn_roles(module: nn.RNNBase, kind: str, ndim: int) -> tuple[str, ...]:
    if kind == "output":  # h_t for every step
        if ndim == 2:  # unbatched input
            return ("token", "hidden")
        return ("batch", "token", "hidden") if module.batch_first else ("token", "batch", "hidden")
    # h_n / c_n: (layers * directions, batch, hidden)
    return ("rnn_layer", "batch", "hidden") if ndim == 3 else default_roles(ndim)


def move_batch_first(tensor: torch.Tensor, roles: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    if "batch" not in roles or roles[0] == "batch":
        return tensor, roles
    axis = roles.index("batch")
    order = (axis, *(i for i in range(len(roles)) if i != axis))
    return tensor.permute(order), tuple(roles[i] for i in order)
