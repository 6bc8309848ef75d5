"""Models dispatched by accelerate: where their inputs go.

accelerate's hooks (``AlignDevicesHook``) replace a module's ``forward``; torch's own forward
hooks, which the backend uses, run around that replacement, so they see each call's inputs as
the caller gave them and its outputs after accelerate has put the weights away again. What the
backend must not do is take a weight's device for the model's: an offloaded weight sits on the
meta device between calls.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its inputs: accelerate's execution device where its hooks
    dispatch the model (its offloaded weights sit on the meta device between calls), else
    the device of its first weight that holds values."""
    root_hook = getattr(model, "_hf_hook", None)
    device = getattr(root_hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    for module in model.modules():  # everything offloaded (cpu_offload, disk_offload)
        hook = getattr(module, "_hf_hook", None)
        for part in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook
            device = getattr(part, "execution_device", None)
            if device is not None:
                return torch.device(device)
    return torch.device("cpu")
