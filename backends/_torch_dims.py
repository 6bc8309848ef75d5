"""Dimension roles of PyTorch tensors: channels-first convolutions, RNN layouts, attention."""

from __future__ import annotations

import torch
from torch import nn

from layerscope.core.naming import default_roles, feature_role

_CHANNELS_FIRST = (
    "Conv", "ConvTranspose", "BatchNorm", "InstanceNorm", "MaxPool", "AvgPool", "AdaptiveAvgPool",
    "AdaptiveMaxPool", "LPPool", "Upsample", "PixelShuffle", "Dropout1d", "Dropout2d",
    "Dropout3d", "ZeroPad", "ReflectionPad", "ReplicationPad", "ConstantPad",
)
_SPATIAL = {3: ("width",), 4: ("height", "width"), 5: ("depth", "height", "width")}


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
        return ("batch", feature_role(tensor.shape[-1], hidden_size))
    if ndim == 3:
        return ("batch", "token", feature_role(tensor.shape[-1], hidden_size))
    return default_roles(ndim)


def _rnn_roles(module: nn.RNNBase, kind: str, ndim: int) -> tuple[str, ...]:
    if kind == "output":  # h_t for every step
        if ndim == 2:  # unbatched input
            return ("token", "hidden")
        return ("batch", "token", "hidden") if module.batch_first else ("token", "batch", "hidden")
    # h_n / c_n: (layers * directions, batch, hidden)
    return ("rnn_layer", "batch", "hidden") if ndim == 3 else default_roles(ndim)
