"""Traces written straight through core (no framework): exact values chosen by the test."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.core import Recorder, Selection, StoreOptions
from layerscope.core.format import new_group_attrs
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter

Tensor = tuple[str, str, np.ndarray, tuple[str, ...]]


def write_trace(path: Path | str, batches: Iterable[list[Tensor]],
                options: StoreOptions | None = None, tokens: Iterable[Any] | None = None) -> Path:
    """Write one pass per element of ``batches``: (site, kind, array, roles) tuples."""
    attrs = new_group_attrs("numpy", np.__version__, {"class": "synthetic"}, Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    writer = TraceWriter(group, options or StoreOptions(mode="w"))
    recorder = Recorder(writer, Selection(), "numpy",
                        (lambda ids: [f"t{i}" for i in ids]) if tokens is not None else None)
    token_batches = iter(tokens) if tokens is not None else None
    try:
        for tensors in batches:
            size = tensors[0][2].shape[0]
            ids = next(token_batches) if token_batches is not None else None
            recorder.begin_pass(size, ids)
            for site, kind, array, roles in tensors:
                recorder.put(site, kind, array, roles, "Synthetic")
            recorder.end_pass()
    finally:
        recorder.close()
    return Path(path)
