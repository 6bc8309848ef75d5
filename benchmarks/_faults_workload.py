"""The fault campaign's workload: deterministic batches, written by a forked writer, read back."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from _common import Send

from layerscope import LayerscopeError
from layerscope.core import Selection, StoreOptions
from layerscope.core.format import new_group_attrs
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter

# -- the workload --------------------------------------------------------------------------------

#: variable -> (site, kind, roles); block.1 and head are skipped in some batches
SITES = {
    "embed@output": ("embed", "output", ("batch", "token", "embedding")),  # 6 KiB a sample
    "block.0@output": ("block.0", "output", ("batch", "token", "hidden")),
    "block.0@attention": ("block.0", "attention", ("batch", "head", "query", "key")),  # sparse
    "block.1@output": ("block.1", "output", ("batch", "token", "hidden")),
    "head@logits": ("head", "logits", ("batch", "token")),
}
LABELS = ("token_id", "batch")


@dataclass
class Workload:
    """The data of batch ``n`` written by session ``session``: a function of both only."""

    seed: int
    sizes: dict[int, list[int]] = field(default_factory=dict)  # fixed sizes of some sessions

    def arrays(self, session: int, n: int) -> dict[str, np.ndarray]:
        pick = random.Random(f"{self.seed}:{session}:{n}")
        fixed = self.sizes.get(session)
        size = fixed[n] if fixed else pick.randint(1, 6)
        skip1, skip_head = pick.random() < 0.4, pick.random() < 0.2
        g = np.random.default_rng([self.seed, session, n])
        out = {
            "embed@output": g.standard_normal((size, 6, 256), dtype=np.float32),
            "block.0@output": g.standard_normal((size, 6, 8), dtype=np.float32),
            "block.0@attention": np.tril(g.random((size, 2, 16, 16), dtype=np.float32)),
            "block.1@output": g.standard_normal((size, 6, 8), dtype=np.float32),
            "head@logits": g.integers(-1000, 1000, (size, 6), dtype=np.int32),
            "token_id": g.integers(0, 30000, (size, 6), dtype=np.int64),
        }
        if skip1:
            del out["block.1@output"]
        if skip_head:
            del out["head@logits"]
        return out

    def expected(self, owners: list[int]) -> dict[str, np.ndarray | None]:
        """Each variable's values for committed batches written by ``owners`` (session of
        batch n); None for one no committed batch holds (absent, or fill values only)."""
        batches = [self.arrays(s, n) for n, s in enumerate(owners)]
        out: dict[str, np.ndarray | None] = {}
        for name in (*SITES, "token_id"):
            shapes = [b.get(name) for b in batches]
            known = next((a for a in shapes if a is not None), None)
            if known is None:
                out[name] = None
                continue
            fill = np.nan if known.dtype.kind == "f" else 0
            out[name] = np.concatenate([
                a if a is not None else np.full((len(b["token_id"]), *known.shape[1:]), fill,
                                                known.dtype)
                for a, b in zip(shapes, batches, strict=True)])
        rows = sum(len(b["token_id"]) for b in batches)
        out["batch"] = np.arange(rows, dtype=np.int64)
        return out


def write_session(path: Path, mode: str, session: int, batches: int, options: StoreOptions,
                  work: Workload, send: Send) -> None:
    """One writer: open ``path`` with ``mode``, trace ``batches`` batches, close."""
    attrs = new_group_attrs("numpy", "0", {"class": "faults"}, Selection().to_json())
    group, existing = open_group_for_writing(path, mode, attrs)
    start = int(existing.get("committed_batches", 0))
    writer = TraceWriter(group, replace(options, mode=mode),
                         int(existing.get("committed_samples", 0)), start)
    recorder = Recorder(writer, Selection(), "numpy")
    send({"k": "open", "start": start})
    for n in range(start, start + batches):
        arrays = work.arrays(session, n)
        recorder.begin_pass(len(arrays["token_id"]), token_ids=arrays["token_id"])
        for name, (site, kind, roles) in SITES.items():
            if name in arrays:
                recorder.put(site, kind, arrays[name], roles)
        recorder.end_pass()
    recorder.close()
    send({"k": "done", "n": start + batches})


def compare(ds: Any, expected: dict[str, np.ndarray | None]) -> tuple[list[str], list[str]]:
    """Read every variable of ``ds``: (silently wrong ones, refused ones); untyped errors
    propagate. A variable no committed batch holds may be absent or hold fill values only."""
    wrong, refused = [], []
    known = {*SITES, *LABELS}
    for name in ds.data_vars:
        if str(name) not in known:
            wrong.append(f"{name}: a variable that was never written")
    for name, want in expected.items():
        if name not in ds.variables:
            if want is not None and len(want):
                wrong.append(f"{name}: missing")
            continue
        try:
            got = ds[name].values
        except LayerscopeError as exc:
            refused.append(f"{name}: {type(exc).__name__}")
            continue
        if want is None:
            if got.dtype.kind == "f" and not np.isnan(got).all() or \
                    got.dtype.kind != "f" and got.any():
                wrong.append(f"{name}: values where no committed batch wrote any")
        elif got.dtype != want.dtype or got.shape != want.shape:
            wrong.append(f"{name}: {got.dtype}{got.shape} instead of {want.dtype}{want.shape}")
        elif not np.array_equal(got, want, equal_nan=True):
            rows = np.flatnonzero([not np.array_equal(a, b, equal_nan=True)
                                   for a, b in zip(got, want, strict=True)])
            wrong.append(f"{name}: rows {rows[:8].tolist()} differ")
    return wrong, refused


