"""The dtype a PyTorch tensor is stored as.

NumPy, and so Zarr, has no bfloat16, no float8 types and no 32-bit complex: those are widened
to float32 (complex64), exactly, as every value of the narrow type is one of the wide type.
A dtype with no NumPy type even so (quantized tensors, the bit types, packed float4) cannot be
stored: the capture skips its variable and records why (:data:`UNSTORABLE`).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

_FLOAT8 = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
           "float8_e8m0fnu")

#: dtypes NumPy lacks, and the wider one each is stored as
WIDENED: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.float32,
    torch.complex32: torch.complex64,
    **{getattr(torch, name): torch.float32 for name in _FLOAT8 if hasattr(torch, name)},
}

UNSTORABLE = ("its dtype {dtype} has no NumPy type to store it as; dequantize it or cast it to "
              "a float type in the model to capture it")


def widened(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype a tensor of ``dtype`` is copied off its device as."""
    return WIDENED.get(dtype, dtype)


@functools.cache
def stored_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The NumPy dtype a tensor of ``dtype`` is stored as; None: it cannot be stored."""
    try:
        with warnings.catch_warnings():  # making a quantized tensor warns that it is deprecated
            warnings.simplefilter("ignore")
            return torch.empty((), dtype=widened(dtype)).numpy().dtype
    except (TypeError, RuntimeError):
        return None


def unstorable(dtype: torch.dtype) -> str:
    """Why a tensor of ``dtype`` (``stored_dtype`` None) is not stored."""
    return UNSTORABLE.format(dtype=str(dtype).removeprefix("torch."))
