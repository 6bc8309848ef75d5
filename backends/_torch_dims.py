"""Dimension roles of PyTorch tensors: channels-first convolutions, RNN layouts, attention.

Roles come from what a module is, never from a tensor's rank or a class name alone:

- ``channel`` and the spatial axes only for the channels-first modules of ``torch.nn``
  (convolutions, pooling, batch/instance/group norm, padding, ...; subclasses included, checked
  with ``isinstance``), at the rank that module works on, and for a tensor that is one of
  theirs passed on unchanged (a container returning it, an in-place activation) or through an
  elementwise activation or dropout;
- the last axis of a linear layer (``nn.Linear`` and Conv1D-style layers such as GPT-2's, which
  are linear layers whatever their class name) is its features, ``hidden`` or ``neuron``;
- a 2-d or 3-d tensor of another module is (batch, feature) or (batch, token, feature);
- anything else gets neutral names (``batch``, ``axis1``, ...).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import batchnorm, conv, padding, pooling

from layerscope.core.naming import default_roles, feature_role

_SPATIAL = {3: ("width",), 4: ("height", "width"), 5: ("depth", "height", "width")}

_CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    conv._ConvNd, pooling._MaxPoolNd, pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd,
    pooling._AdaptiveMaxPoolNd, pooling._LPPoolNd, pooling._MaxUnpoolNd,
    nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, batchnorm._NormBase, nn.GroupNorm,
    nn.LocalResponseNorm, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, padding._ConstantPadNd, padding._ReflectionPadNd,
    padding._ReplicationPadNd, padding._CircularPadNd,
)

#: modules whose output has the roles of their input: elementwise activations and dropout
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink,
    nn.Softshrink, nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)


def roles_for(module: nn.Module, kind: str, tensor: torch.Tensor, hidden_size: int | None,
              inherited: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Role names for each axis of ``tensor`` taken as ``kind`` at ``module``; ``inherited``:
    the channels-first roles this very tensor (or, for an elementwise module, its input)
    was given at another site, if any."""
    ndim = tensor.dim()
    if kind == "attention":  # (batch, query, key): heads averaged (nn.MultiheadAttention)
        return {4: ("batch", "head", "query", "key"),
                3: ("batch", "query", "key")}.get(ndim) or default_roles(ndim)
    if isinstance(module, nn.MultiheadAttention) and kind == "output.1":
        # the weights it returns: per head, or averaged over heads (the default)
        return roles_for(module, "attention", tensor, hidden_size)
    if isinstance(module, nn.RNNBase) and kind.startswith("output"):
        return _rnn_roles(module, kind, ndim)
    if inherited is not None and len(inherited) == ndim:
        return inherited
    if is_channels_first(module, ndim):
        return ("batch", "channel", *_SPATIAL[ndim])
    if ndim == 1:
        return ("batch",)
    feature = feature_role(tensor.shape[-1], hidden_size)
    if ndim >= 4 and is_linear(module):
        return (*default_roles(ndim)[:-1], feature)
    if ndim == 2:
        return ("batch", feature)
    if ndim == 3:
        return ("batch", "token", feature)
    return default_roles(ndim)


def is_channels_first(module: nn.Module, ndim: int) -> bool:
    """Whether ``module`` is a channels-first ``torch.nn`` module working on ``ndim``-d
    tensors (batch, channel, spatial...): an unbatched call or another rank is not."""
    if ndim not in _SPATIAL or not isinstance(module, _CHANNELS_FIRST):
        return False
    spatial = _spatial_rank(module)
    return spatial is None or ndim == 2 + spatial


def is_elementwise(module: nn.Module) -> bool:
    """Activations and dropout, of ``torch.nn`` or of ``transformers.activations``."""
    return isinstance(module, _ELEMENTWISE) or \
        type(module).__module__ == "transformers.activations"


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` and Conv1D-style layers (GPT-2's ``transformers.pytorch_utils.Conv1D``, a
    linear layer with its weight stored (in, out) and ``nf`` out features), told apart by the
    layer's own fields, not its class name."""
    if isinstance(module, nn.Linear):
        return True
    out = getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    return (isinstance(out, int) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and int(weight.shape[1]) == out)


def _spatial_rank(module: nn.Module) -> int | None:
    """How many spatial axes ``module`` works on, where it says: a convolution's kernel, else
    the ``1d``/``2d``/``3d`` of the ``torch.nn`` class it derives from; None: any rank."""
    if isinstance(module, conv._ConvNd):
        return len(module.kernel_size)
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.") and cls.__name__[-2:] in ("1d", "2d", "3d"):
            return int(cls.__name__[-2])
    return None


def _rnn_roles(module: nn.RNNBase, kind: str, ndim: int) -> tuple[str, ...]:
    if kind == "output":  # h_t for every step
        if ndim == 2:  # unbatched input
            return ("token", "hidden")
        return ("batch", "token", "hidden") if module.batch_first else ("token", "batch", "hidden")
    # h_n / c_n: (layers * directions, batch, hidden)
    return ("rnn_layer", "batch", "hidden") if ndim == 3 else default_roles(ndim)
