"""Compare two traces variable by variable: ``layerscope.diff(a, b)``.

The variables of A and B are paired (an explicit name map, else automatically; see
:mod:`layerscope.core.namemap`), each B variable is transposed by dim roles to A's layout, and
every pair is read block by block (whole chunks along ``batch``, split further when one sample
is large), so memory stays flat whatever the size of the traces. For each pair the diff reports
the largest absolute and relative error, the cosine similarity, the relative L2 error and
whether ``|a - b| <= atol + rtol * |b|`` holds everywhere. The first divergence is the earliest
pair, in A's execution order, that fails.

Relative error is symmetric: ``|a - b| / max(|a|, |b|)`` (0 where both are 0), so it never
exceeds 2 and does not depend on which trace is called A.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LayerscopeError
from .format import BATCH, TOKEN_ID
from .namemap import (
    NameMap,
    NameMapError,
    lcs_pairs,
    line_up,
    load_name_map,
    signature,
)
from .reader import captured_names, open_trace

MB = 1 << 20

STATUS_OK = "ok"
STATUS_DIFFERS = "differs"
STATUS_MISMATCH = "mismatch"  # shapes or dtypes that cannot be compared


class DiffError(LayerscopeError):
    """Two traces cannot be compared (nothing pairs, bad tolerance, unreadable input)."""


@dataclass(frozen=True)
class DiffOptions:
    """Tolerances and the read budget.

    The default tolerances accept float32 round-off accumulated through a deep network
    (two frameworks doing the same arithmetic in a different order: all-MiniLM-L6-v2 in
    PyTorch and Keras stays within 2e-4 absolute, 4e-6 relative L2, at every site) and flag
    anything that changes the math: a different activation approximation, epsilon, or weight.
    ``block_bytes`` caps what one read of one side holds; a block is a whole number of chunks
    when a chunk fits (layerscope writes chunks of at most 16 MB), so no chunk is read twice.
    """

    rtol: float = 1e-4
    atol: float = 1e-4
    block_bytes: int = 16 * MB

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise DiffError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.block_bytes < 1024:
            raise DiffError(f"block_bytes must be at least 1024, not {self.block_bytes}")


@dataclass(frozen=True)
class PairResult:
    """The comparison of one variable of A with its partner in B."""

    a: str
    b: str
    order: int
    layer: int | None
    status: str
    max_abs: float
    max_rel: float
    cosine: float
    rel_l2: float
    n_bad: int
    size: int
    worst: dict[str, int] = field(default_factory=dict)
    note: str = ""
    blocks: int = 0

    @property
    def passed(self) -> bool:
        return self.status == STATUS_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "order": self.order, "layer": self.layer,
            "status": self.status, "passed": self.passed,
            "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
            "cosine": _num(self.cosine), "rel_l2": _num(self.rel_l2),
            "n_bad": self.n_bad, "size": self.size, "worst": self.worst, "note": self.note,
            "blocks": self.blocks,
        }


@dataclass(frozen=True)
class DiffResult:
    """Everything ``diff`` found; ``passed`` is True when every pair agrees."""

    a: str
    b: str
    frameworks: tuple[str, str]
    options: DiffOptions
    method: str  # "map" or "auto"
    pairs: tuple[PairResult, ...]
    unmatched_a: tuple[str, ...]
    unmatched_b: tuple[str, ...]
    notes: tuple[str, ...] = ()
    name_map: str = ""

    @property
    def failed(self) -> tuple[PairResult, ...]:
        return tuple(p for p in self.pairs if not p.passed)

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def first_divergence(self) -> PairResult | None:
        """The earliest pair in A's execution order beyond tolerance."""
        return next(iter(self.failed), None)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_json(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "a": self.a, "b": self.b, "frameworks": list(self.frameworks),
            "rtol": self.options.rtol, "atol": self.options.atol,
            "method": self.method, "name_map": self.name_map,
            "passed": self.passed, "compared": len(self.pairs), "failed": len(self.failed),
            "first_divergence": first.to_json() if first else None,
            "pairs": [p.to_json() for p in self.pairs],
            "unmatched_a": list(self.unmatched_a), "unmatched_b": list(self.unmatched_b),
            "notes": list(self.notes),
        }

    def table(self, max_unmatched: int = 20) -> str:
        """A terminal table: one row per pair, then the verdict and unmatched sites."""
        return format_result(self, max_unmatched)


def _num(value: float) -> float | str:
    """JSON has no NaN or infinity; write them as strings."""
    return float(value) if math.isfinite(value) else str(value)


# -- entry point -----------------------------------------------------------------------------


TraceLike = str | Path | Any
NameMapLike = str | Path | Mapping[str, Any] | NameMap | None


def diff(a: TraceLike, b: TraceLike, name_map: NameMapLike = None, rtol: float | None = None,
         atol: float | None = None, options: DiffOptions | None = None) -> DiffResult:
    """Compare the traces ``a`` and ``b`` (paths or datasets from ``open_trace``).

    ``name_map``: a dict or a JSON / YAML file pairing names of A with names of B (patterns
    with ``{n}`` layer captures and ``*``); without it variables pair by name, then by
    execution order, kind and dim sizes. ``rtol`` / ``atol`` override ``options``.
    """
    opts = options or DiffOptions()
    if rtol is not None or atol is not None:
        opts = DiffOptions(opts.rtol if rtol is None else rtol,
                           opts.atol if atol is None else atol, opts.block_bytes)
    ds_a, label_a = _open(a)
    ds_b, label_b = _open(b)
    notes: list[str] = []
    names_a, names_b = captured_names(ds_a), captured_names(ds_b)
    if not names_a or not names_b:
        empty = label_a if not names_a else label_b
        raise DiffError(f"{empty} holds no captured variables; nothing to compare")
    if name_map is not None:
        loaded = load_name_map(name_map)
        pairs = _pairs_from_map(loaded, ds_a, ds_b, names_a, names_b, notes)
        method, map_origin = "map", loaded.origin
    else:
        pairs = _auto_pairs(ds_a, ds_b, names_a, names_b)
        method, map_origin = "auto", ""
        if not pairs:
            raise DiffError(
                f"no variable of {label_a} pairs with one of {label_b} by name, kind and dim "
                "sizes; give a name map (--map FILE) that says which site is which"
            )
        by_position = sum(1 for na, nb in pairs if na != nb)
        if by_position:
            notes.append(
                f"{by_position} pair(s) of differently named sites were matched by execution "
                "order, kind and dim sizes alone; if the two models differ in granularity "
                "(one framework exposes a module the other does not), check the pairs or give "
                "a name map (--map FILE)"
            )
    samples = _common_samples(ds_a, ds_b, label_a, label_b, notes)
    _check_inputs(ds_a, ds_b, samples, notes)
    results = tuple(
        compare(ds_a[na], ds_b[nb], na, nb, opts, samples) for na, nb in pairs
    )
    used_a = {na for na, _ in pairs}
    used_b = {nb for _, nb in pairs}
    return DiffResult(
        a=label_a, b=label_b,
        frameworks=(str(ds_a.attrs.get("framework", "?")), str(ds_b.attrs.get("framework", "?"))),
        options=opts, method=method, pairs=results,
        unmatched_a=tuple(n for n in names_a if n not in used_a),
        unmatched_b=tuple(n for n in names_b if n not in used_b),
        notes=tuple(notes), name_map=map_origin,
    )


def _open(trace: TraceLike) -> tuple[Any, str]:
    if isinstance(trace, (str, Path)):
        return open_trace(trace), str(trace)
    if hasattr(trace, "data_vars") and hasattr(trace, "attrs"):
        return trace, str(trace.encoding.get("source", "<dataset>"))
    raise DiffError(
        f"cannot compare a {type(trace).__qualname__}: give a trace path or a Dataset from "
        "layerscope.open_trace"
    )


# -- pairing ---------------------------------------------------------------------------------


def _pairs_from_map(name_map: NameMap, ds_a: Any, ds_b: Any, names_a: list[str],
                    names_b: list[str], notes: list[str]) -> list[tuple[str, str]]:
    available = set(names_b)
    pairs: list[tuple[str, str]] = []
    missing: list[str] = []
    used_rules: set[str] = set()
    for name in names_a:
        target, rule = name_map.target(name, available)
        if target is not None:
            pairs.append((name, target))
            used_rules.add(rule)
        elif rule:
            missing.append(f"{name} (rule {rule})")
    if not pairs:
        hint_a = ", ".join(names_a[:3])
        hint_b = ", ".join(names_b[:3])
        why = (f"its rules point at names B lacks, e.g. {'; '.join(missing[:3])}" if missing
               else "none of its rules matches a variable of A")
        raise NameMapError(
            f"name map {name_map.origin} pairs no variables: {why}. A has e.g. {hint_a}; "
            f"B has e.g. {hint_b}. Fix the patterns ({{n}} matches a number, * any text)"
        )
    idle = [r.source for r in name_map.rules if r.source not in used_rules]
    if idle:
        notes.append(f"{len(idle)} map rule(s) paired nothing: {', '.join(idle)}")
    if missing:
        notes.append(f"{len(missing)} variable(s) of A matched a rule whose target B lacks: "
                     + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return pairs


def _auto_pairs(ds_a: Any, ds_b: Any, names_a: list[str],
                names_b: list[str]) -> list[tuple[str, str]]:
    """Same names first; the rest lined up in execution order by kind and role sizes."""
    in_b = set(names_b)
    paired: dict[str, str] = {n: n for n in names_a if n in in_b}
    rest_a = [n for n in names_a if n not in paired]
    rest_b = [n for n in names_b if n not in paired]
    keys_a = [signature(n, ds_a[n]) for n in rest_a]
    keys_b = [signature(n, ds_b[n]) for n in rest_b]
    for i, j in lcs_pairs(keys_a, keys_b):
        paired[rest_a[i]] = rest_b[j]
    return [(n, paired[n]) for n in names_a if n in paired]


def _common_samples(ds_a: Any, ds_b: Any, label_a: str, label_b: str,
                    notes: list[str]) -> int:
    n_a, n_b = int(ds_a.sizes.get(BATCH, 0)), int(ds_b.sizes.get(BATCH, 0))
    if n_a != n_b:
        notes.append(f"{label_a} holds {n_a} samples and {label_b} {n_b}; "
                     f"compared the first {min(n_a, n_b)}")
    return min(n_a, n_b)


def _check_inputs(ds_a: Any, ds_b: Any, samples: int, notes: list[str]) -> None:
    """Warn when the two traces were made from different token ids (a meaningless diff)."""
    if TOKEN_ID not in ds_a.variables or TOKEN_ID not in ds_b.variables:
        return
    ids_a, ids_b = ds_a[TOKEN_ID], ds_b[TOKEN_ID]
    if ids_a.shape[1:] != ids_b.shape[1:]:
        notes.append(f"token_id shapes differ: {tuple(ids_a.shape)} vs {tuple(ids_b.shape)}")
        return
    rows = min(samples, 4096)  # token ids are small; a prefix tells enough
    if not np.array_equal(ids_a[:rows].values, ids_b[:rows].values):
        notes.append("the traces were made from different token ids: differences may come from "
                     "the inputs, not the model")


# -- streaming comparison --------------------------------------------------------------------


def compare(va: Any, vb: Any, name_a: str, name_b: str, options: DiffOptions,
            samples: int | None = None) -> PairResult:
    """Compare two variables block by block; B is transposed to A's dims by role."""
    order = int(va.attrs.get("order", -1))
    layer_attr = va.attrs.get("layer")
    layer = int(layer_attr) if layer_attr is not None else None

    def mismatch(why: str) -> PairResult:
        nan = float("nan")
        return PairResult(name_a, name_b, order, layer, STATUS_MISMATCH, nan, nan, nan, nan,
                          0, 0, note=why)

    if not (_numeric(va.dtype) and _numeric(vb.dtype)):
        return mismatch(f"dtypes {va.dtype} / {vb.dtype} are not numeric")
    layout = line_up(va, vb, samples)
    if isinstance(layout, str):
        return mismatch(layout)
    acc = _Accumulator(options)
    dims_a = [str(d) for d in va.dims]
    dims_b = [str(d) for d in vb.dims]
    lead = len(layout.axes)
    with _one_read_at_a_time():
        for block in plan_blocks(layout.shape, _chunks_of(va), va.dtype.itemsize,
                                 options.block_bytes, whole_from=lead):
            left = va.isel(dict(zip(dims_a, block, strict=True))).values
            right = vb.isel({dims_b[layout.axes[i]]: block[i] for i in range(lead)}).values
            if lead < len(dims_a) or len(dims_b) != len(dims_a):
                right = right.reshape(left.shape)  # B's trailing axes merged or split to A's
            else:
                right = np.transpose(right, layout.axes)
            acc.add(left, right, tuple(s.start for s in block))
            del left, right
    worst = {d: int(i) for d, i in zip(dims_a, acc.worst_index, strict=False)}
    return acc.result(name_a, name_b, order, layer, worst, layout.note)


def _one_read_at_a_time() -> Any:
    """Dask's synchronous scheduler for the reads: one chunk in flight per side, so memory
    is the block and nothing else (a thread pool would decompress several chunks at once)."""
    try:
        import dask
    except ImportError:  # a Dataset not backed by dask: reads are plain already
        return contextlib.nullcontext()
    return dask.config.set(scheduler="synchronous")


def _numeric(dtype: Any) -> bool:
    return np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)


def _chunks_of(var: Any) -> tuple[int, ...]:
    data = var.data
    size = getattr(data, "chunksize", None)
    if size is not None:
        return tuple(int(n) for n in size)
    chunks = var.encoding.get("chunks") or var.encoding.get("preferred_chunks")
    if isinstance(chunks, Mapping):
        return tuple(int(chunks.get(d, n)) for d, n in zip(var.dims, var.shape, strict=True))
    if chunks:
        return tuple(int(n) for n in chunks)
    return tuple(int(n) for n in var.shape)


def plan_blocks(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int,
                budget: int, whole_from: int | None = None) -> Iterator[tuple[slice, ...]]:
    """Slices that cover ``shape`` in blocks of about ``budget`` bytes, aligned to chunks.

    A block starts as one chunk; whole-sample chunks are stacked along the first axis up to
    the budget; a chunk larger than the budget is cut along its leading axes. Axes from
    ``whole_from`` on are never cut.
    """
    if not shape:
        yield ()
        return
    whole = len(shape) if whole_from is None else whole_from
    block = [max(1, min(c, n)) if i < whole else max(1, n)
             for i, (c, n) in enumerate(zip(chunks or shape, shape, strict=False))]
    block += [max(1, n) for n in shape[len(block):]]

    def nbytes(b: list[int]) -> int:
        return itemsize * math.prod(b)

    axis = 0
    while nbytes(block) > budget and axis < min(whole, len(block)):
        rest = nbytes(block) // block[axis]
        block[axis] = max(1, min(block[axis], budget // max(1, rest)))
        axis += 1
    if block[1:] == list(shape[1:]) and nbytes(block) < budget:
        per = max(1, budget // nbytes(block))
        block[0] = max(1, min(shape[0], block[0] * per))
    starts = [range(0, max(n, 1), b) for n, b in zip(shape, block, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(s, min(s + b, n)) for s, b, n in zip(corner, block, shape, strict=True))


_PIECE = 1 << 18  # elements per arithmetic step: four scratch buffers of 1-2 MB


class _Accumulator:
    """Running statistics over the blocks of one pair (NaN/inf aware)."""

    def __init__(self, options: DiffOptions) -> None:
        self.options = options
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.dot = self.norm_a = self.norm_b = self.norm_d = 0.0
        self.n_bad = 0
        self.size = 0
        self.blocks = 0
        self.worst_index: tuple[int, ...] = ()
        self._worst_value = -1.0
        self._scratch: list[np.ndarray] | None = None

    def add(self, left: np.ndarray, right: np.ndarray, origin: tuple[int, ...]) -> None:
        """Fold one block in, in flat pieces so float64 temporaries stay a few MB."""
        self.blocks += 1
        self.size += left.size
        if left.size == 0:
            return
        flat_a = np.ascontiguousarray(left).reshape(-1)
        flat_b = np.ascontiguousarray(right).reshape(-1)
        for start in range(0, flat_a.size, _PIECE):
            local = self._piece(flat_a[start:start + _PIECE], flat_b[start:start + _PIECE])
            if local is not None:
                index = np.unravel_index(start + local, left.shape)
                self.worst_index = tuple(int(o + i) for o, i in zip(origin, index, strict=True))

    def _buffers(self, dtype: np.dtype[Any], size: int) -> list[np.ndarray]:
        # Reused across pieces: fresh multi-MB temporaries per piece cost more in page
        # faults than the arithmetic itself.
        if self._scratch is None or self._scratch[0].dtype != dtype:
            self._scratch = [np.empty(_PIECE, dtype) for _ in range(4)]
        return [buffer[:size] for buffer in self._scratch]

    def _piece(self, left: np.ndarray, right: np.ndarray) -> int | None:
        """Statistics of one flat piece; returns its worst element when it beats the record.

        Elementwise work runs in float32 for float32 (or narrower) data, in float64 otherwise;
        sums always accumulate in float64.
        """
        work = np.result_type(left.dtype, right.dtype, np.float32)
        a, b, delta, scratch = self._buffers(work, left.size)
        np.copyto(a, left, casting="unsafe")
        np.copyto(b, right, casting="unsafe")
        with np.errstate(invalid="ignore"):  # inf - inf: handled just below
            np.subtract(a, b, out=delta)
        np.abs(delta, out=delta)
        finite = bool(np.isfinite(delta).all())
        if not finite:
            # NaN against NaN and equal infinities agree; any other NaN or inf is an error
            same = (np.isnan(a) & np.isnan(b)) | (a == b)
            delta[same] = 0.0
            delta[np.isnan(delta)] = np.inf
            keep = np.isfinite(a) & np.isfinite(b)
            a[~keep] = 0.0
            b[~keep] = 0.0
        np.abs(b, out=scratch)
        scratch *= self.options.rtol
        scratch += self.options.atol
        self.n_bad += int(np.count_nonzero(delta > scratch))
        flat = int(np.argmax(delta))
        peak = float(delta[flat])
        self.max_abs = max(self.max_abs, peak)
        self.dot += float(np.einsum("i,i->", a, b, dtype=np.float64))
        self.norm_a += float(np.einsum("i,i->", a, a, dtype=np.float64))
        self.norm_b += float(np.einsum("i,i->", b, b, dtype=np.float64))
        np.abs(a, out=a)
        np.abs(b, out=b)
        np.maximum(a, b, out=scratch)  # max(|a|, |b|): 0 only where both are 0
        np.divide(delta, scratch, out=scratch, where=scratch > 0)
        self.max_rel = max(self.max_rel, float(scratch.max()),
                           math.inf if peak == math.inf else 0.0)
        if not finite:
            delta[~np.isfinite(delta)] = 0.0
        self.norm_d += float(np.einsum("i,i->", delta, delta, dtype=np.float64))
        if peak > self._worst_value:
            self._worst_value = peak
            return flat
        return None

    def result(self, name_a: str, name_b: str, order: int, layer: int | None,
               worst: dict[str, int], note: str) -> PairResult:
        if self.norm_a == 0.0 and self.norm_b == 0.0:
            cosine = 1.0
        elif self.norm_a == 0.0 or self.norm_b == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.norm_a * self.norm_b)
        rel_l2 = math.sqrt(self.norm_d / self.norm_b) if self.norm_b > 0 else (
            0.0 if self.norm_d == 0 else math.inf)
        status = STATUS_OK if self.n_bad == 0 else STATUS_DIFFERS
        return PairResult(name_a, name_b, order, layer, status, self.max_abs, self.max_rel,
                          cosine, rel_l2, self.n_bad, self.size, worst, note, self.blocks)


# -- terminal output -------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def format_result(result: DiffResult, max_unmatched: int = 20) -> str:
    """The table ``layerscope diff`` prints."""
    first = result.first_divergence
    header = ("#", "site in A", "site in B", "max abs", "max rel", "rel L2", "cosine", "status")
    rows = []
    for index, pair in enumerate(result.pairs, 1):
        status = pair.status
        if pair is first:
            status += "  <- first divergence"
        cosine = "-" if math.isnan(pair.cosine) else f"{pair.cosine:.9f}"
        rows.append((str(index), pair.a, "=" if pair.b == pair.a else pair.b,
                     _fmt(pair.max_abs), _fmt(pair.max_rel), _fmt(pair.rel_l2), cosine, status))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = [
        f"A: {result.a} ({result.frameworks[0]})",
        f"B: {result.b} ({result.frameworks[1]})",
        f"pairing: {result.method}" + (f" ({result.name_map})" if result.name_map else "")
        + f"; tolerance |a-b| <= {result.options.atol:g} + {result.options.rtol:g} * |b|",
        "",
    ]
    for row in (header, *rows):
        cells = [c.rjust(w) if i in (0, 3, 4, 5, 6) else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.append("")
    failed = len(result.failed)
    lines.append(f"{len(result.pairs)} pairs compared, {len(result.pairs) - failed} agree, "
                 f"{failed} beyond tolerance")
    if first is not None:
        where = ", ".join(f"{d}={i}" for d, i in first.worst.items())
        lines.append(f"first divergence: {first.a} <-> {first.b}: {first.status}, max abs "
                     f"{_fmt(first.max_abs)}" + (f" at {where}" if where else "")
                     + (f" ({first.note})" if first.note else ""))
    else:
        lines.append("all compared pairs agree within tolerance")
    grouped: dict[str, list[str]] = {}
    for pair in result.pairs:
        if pair.note and pair is not first:
            grouped.setdefault(pair.note, []).append(pair.a)
    notes = [f"{names[0]}: {note}" if len(names) == 1
             else f"{note} ({len(names)} pairs, e.g. {names[0]})"
             for note, names in grouped.items()]
    for title, names in (("only in A", result.unmatched_a), ("only in B", result.unmatched_b)):
        if names:
            shown = ", ".join(names[:max_unmatched])
            more = f" ... (+{len(names) - max_unmatched})" if len(names) > max_unmatched else ""
            lines.append(f"{title} ({len(names)}): {shown}{more}")
    for note in (*result.notes, *notes[:max_unmatched]):
        lines.append(f"note: {note}")
    return "\n".join(lines)
