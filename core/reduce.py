"""Only the data a user asks for: token positions and reductions, applied inside the hook.

A selection may ask, per site and kind, for *chains* of steps instead of the whole tensor (or
beside it): ``"model.layers.*@output:last"``, ``"*.mlp@output:mean,output:topk(8)"``, or
``trace(..., positions="last", reduce=["norm"])``. A backend computes each chain in its
framework's own ops, on the tensor's device, before anything is copied off it, through the
few array operations of :class:`ArrayOps`; only the results are copied and written, each as a
variable of its own, ``<site>@<kind>:<step>[:<step>...]`` with every step naming the axis it
worked on (``layers.3@output:last(token)``, ``layers.3@output:topk(hidden,8)``).

Steps (``name`` or ``name(axis, argument)``; the axis may be left out)

    last, first   the last / first real token of each sample (by the pass's attention mask:
                  left or right padding): the axis is removed
    slice(a:b)    positions a..b-1 of each sample's real tokens, counted from its first real
                  token (negative: from its end, ``slice(-4:)``); a fixed number of positions,
                  on a new axis ``<axis>_slice``, filled where a sample has fewer tokens
    mask          every position, with the fill value where the sample has no token (the
                  shape stays the same; see README, "Only the data you ask for")
    mean          the mean over a token axis, padding excluded: the axis is removed
    norm          the L2 norm over the feature axis: the axis is removed
    topk(k)       the k largest values over the feature axis, largest first, on a new axis
                  ``k``; a second variable ``...:topk(hidden,k):index`` holds their indices

Positions and ``mean`` work on a token axis (``token``, else ``query``; or the one named:
``last(key)``), ``norm`` and ``topk`` on the feature axis (``hidden``, else ``neuron``, else
``channel``). A tensor without that axis is not reduced; the store's ``skipped`` attribute
says why. The real tokens are the pass's mask where the backend was given one (every position
counts where none was); positions assume the real tokens of a sample are contiguous.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .naming import DECODER_PREFIX
from .reduce_spec import FULL, Chain, Step

_FEATURE_AXES = ("hidden", "neuron", "channel")
#: the axis a step works on when none is named: the first of these a tensor has
_DEFAULT_AXES = {"token": ("token", "decoder_token", "query", "decoder_query"),
                 "feature": _FEATURE_AXES}
INDEX_SUFFIX = ":index"
SLICE_SUFFIX = "_slice"

__all__ = ["FULL", "INDEX_SUFFIX", "SLICE_SUFFIX", "ArrayOps", "Chain", "PassMasks", "Piece",
           "Step", "Unreducible", "apply_chains"]


class ArrayOps(Protocol):
    """The array operations a backend lends the reductions, in its framework's own ops.

    ``x`` is a captured tensor (batch first), ``axis`` an axis of it (never 0). Masks and
    positions are (batch, n), (1, n) or (n,); ``first`` / ``count`` (batch, 1) integer
    tensors, or plain ints. Results stay on the tensor's device; nothing is copied to the
    host."""

    def spans(self, mask: Any) -> tuple[Any, Any]:
        """Each sample's first real position and number of real positions, (batch, 1) ints,
        from a (batch, length) mask (nonzero: a real token)."""
        ...

    def arange(self, n: int, like: Any) -> Any:
        """0..n-1 as a 1-d integer tensor on ``like``'s device, of ``spans``' dtype."""
        ...

    def take(self, x: Any, axis: int, index: Any) -> Any:
        """``x`` at positions ``index`` (batch or 1, n) along ``axis``, clipped into the axis:
        the axis then has length n."""
        ...

    def fill(self, x: Any, axis: int, keep: Any) -> Any:
        """``x`` where ``keep`` (batch, length along ``axis``), elsewhere its dtype's fill
        value (NaN for floats, -1 for signed integers, 0 for unsigned ones)."""
        ...

    def mean(self, x: Any, axis: int, keep: Any) -> Any:
        """The mean over ``axis`` of the positions ``keep`` holds (all when ``keep`` is None),
        in float32 at least."""
        ...

    def norm(self, x: Any, axis: int) -> Any:
        """The L2 norm over ``axis``, in float32 at least."""
        ...

    def topk(self, x: Any, axis: int, k: int) -> tuple[Any, Any]:
        """The ``k`` largest values along ``axis``, largest first, and their indices, both
        with ``axis`` of length ``k``."""
        ...


# -- applying chains ----------------------------------------------------------------------------


class Unreducible(Exception):
    """A chain cannot be applied to a tensor (no such axis, a mask of another length)."""


@dataclass
class Piece:
    """One result to put: the whole tensor (``attrs`` empty) or a reduction of it."""

    kind: str
    value: Any
    roles: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


class PassMasks:
    """The real-token masks of one pass as the model's own tensors, by token axis (``token``,
    ``decoder_token``); None where the pass was given none. Spans are computed once each."""

    def __init__(self, batch: int | None, token: Any = None, decoder_token: Any = None) -> None:
        self.batch = batch  # None: not known until a graph runs
        self.masks = {"token": _two_dimensional(token, batch),
                      "decoder_token": _two_dimensional(decoder_token, batch)}
        self._spans: dict[str, tuple[Any, Any]] = {}

    def batched(self, size: Any) -> bool:
        """Whether an axis of ``size`` can be the pass's batch (unknown sizes can)."""
        size = _static(size)
        return size is None or self.batch is None or size == self.batch

    def mask(self, role: str, length: int | None) -> Any:
        """The mask of the token axis that axis ``role`` indexes; None: none given. Raises
        :class:`Unreducible` when its length is not the axis's."""
        family = "decoder_token" if role.startswith(DECODER_PREFIX) else "token"
        mask = self.masks[family]
        known = _static(mask.shape[1]) if mask is not None else None
        if mask is not None and None not in (known, length) and known != length:
            raise Unreducible(f"the {family} mask has {known} positions, the {role} axis "
                              f"{length} (a cached step, or another sequence)")
        return mask

    def spans(self, ops: ArrayOps, role: str, mask: Any) -> tuple[Any, Any]:
        family = "decoder_token" if role.startswith(DECODER_PREFIX) else "token"
        if family not in self._spans:
            self._spans[family] = ops.spans(mask)
        return self._spans[family]


def _two_dimensional(mask: Any, batch: int | None) -> Any:
    shape = getattr(mask, "shape", None)
    if shape is None or len(shape) != 2 or None not in (batch, _static(shape[0])) and \
            _static(shape[0]) != batch:
        return None
    return mask


def _static(size: Any) -> int | None:
    try:
        return int(size)
    except (TypeError, ValueError):
        return None  # unknown until the graph runs


def apply_chains(chains: Iterable[Chain], kind: str, value: Any, roles: tuple[str, ...],
                 ops: ArrayOps, masks: PassMasks) -> tuple[list[Piece], dict[str, str]]:
    """The pieces to put for ``value`` (taken as ``kind``), one per chain (two for topk), and
    ``{kind:chain: why}`` for each chain it cannot take."""
    pieces: list[Piece] = []
    skipped: dict[str, str] = {}
    for chain in chains:
        if not chain:
            pieces.append(Piece(kind, value, roles))
            continue
        try:
            pieces.extend(_apply(chain, kind, value, roles, ops, masks))
        except Unreducible as why:
            skipped[f"{kind}:{':'.join(s.text() for s in chain)}"] = str(why)
    return pieces, skipped


def _axis_of(step: Step, roles: tuple[str, ...]) -> str:
    group = "feature" if step.name in ("norm", "topk") else "token"
    if step.axis is not None:
        named = [r for r in roles if r == step.axis or r == DECODER_PREFIX + step.axis]
        if not named:
            raise Unreducible(f"{step.text()}: no {step.axis} axis in dims {roles}")
        return named[0]
    candidates = _DEFAULT_AXES[group]
    if step.name == "mean":  # the mean of a slice's positions
        candidates += tuple(f"{axis}{SLICE_SUFFIX}" for axis in candidates)
    found = next((r for r in candidates if r in roles), None)
    if found is None:
        wanted = "token" if group == "token" else "feature (hidden, neuron, channel)"
        raise Unreducible(f"{step.text()}: no {wanted} axis in dims {roles}")
    return found


def _apply(chain: Chain, kind: str, value: Any, roles: tuple[str, ...], ops: ArrayOps,
           masks: PassMasks) -> list[Piece]:
    labels: list[str] = []
    masked: bool | None = None
    current = roles
    sliced: dict[str, Any] = {}  # a slice's axis -> which of its positions a sample has
    for step in chain:
        role = _axis_of(step, current)
        axis = current.index(role)
        labels.append(step.text(role))
        if step.name == "topk":
            values, index = _topk(value, axis, step, ops)
            current = current[:axis] + ("k",) + current[axis + 1:]
            attrs = _attrs(kind, roles, labels, masked)
            name = f"{kind}:{':'.join(labels)}"
            return [Piece(name, values, current, {**attrs, "topk": "values"}),
                    Piece(name + INDEX_SUFFIX, index, current, {**attrs, "topk": "index"})]
        if step.name == "norm":
            value = ops.norm(value, axis)
            current = current[:axis] + current[axis + 1:]
            continue
        if role in sliced:  # mean over a slice: its filled positions excluded
            value = ops.mean(value, axis, sliced[role])
            current = current[:axis] + current[axis + 1:]
            continue
        length = _static(value.shape[axis])
        mask = masks.mask(role, length)
        masked = bool(masked) or mask is not None
        if step.name == "mean":
            value = ops.mean(value, axis, mask)
            current = current[:axis] + current[axis + 1:]
        elif step.name == "mask":
            value = ops.fill(value, axis, mask) if mask is not None else value
        elif step.name == "slice":
            value, sliced[role + SLICE_SUFFIX] = _positions(
                value, axis, step, ops, masks.spans(ops, role, mask) if mask is not None
                else (0, length), mask is None)
            current = current[:axis] + (role + SLICE_SUFFIX,) + current[axis + 1:]
        else:
            value = _positions(value, axis, step, ops, masks.spans(ops, role, mask)
                               if mask is not None else (0, length), mask is None)[0]
            value = value[(slice(None),) * axis + (0,)]  # one position: the axis goes
            current = current[:axis] + current[axis + 1:]
    return [Piece(f"{kind}:{':'.join(labels)}", value, current,
                  _attrs(kind, roles, labels, masked))]


def _positions(value: Any, axis: int, step: Step, ops: ArrayOps, spans: tuple[Any, Any],
               unmasked: bool) -> tuple[Any, Any]:
    """Positions ``step.start``.. of each sample's real tokens, counted from its first real
    position (from its end when negative), filled where a sample has none there; and which
    of them each sample has (None: all)."""
    first, count = spans
    if count is None:
        raise Unreducible(f"{step.text()}: the axis's length is unknown and no mask was given")
    start = step.start or 0
    if unmasked and isinstance(count, int) and \
            (step.length + start <= count if start >= 0 else -start <= count):
        # the same positions in every sample, all there: a plain slice (a view; the capture
        # copies it), where gathering them takes several device kernels a tensor
        low = start if start >= 0 else count + start
        return value[(slice(None),) * axis + (slice(low, low + step.length),)], None
    # beside the mask, not the tensor: a model spread over devices has one mask for all
    offsets = ops.arange(step.length, value if isinstance(count, int) else count)
    relative = offsets + start if start >= 0 else offsets + (count + start)
    taken = ops.take(value, axis, first + relative)
    keep = (relative >= 0) & (relative < count)  # some sample lacks some of these positions
    return ops.fill(taken, axis, keep), keep


def _topk(value: Any, axis: int, step: Step, ops: ArrayOps) -> tuple[Any, Any]:
    size = _static(value.shape[axis])
    assert step.k is not None
    if size is not None and size < step.k:
        raise Unreducible(f"{step.text()}: the axis has only {size} entries")
    return ops.topk(value, axis, step.k)


def _attrs(kind: str, roles: tuple[str, ...], labels: list[str],
           masked: bool | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"reduction": ":".join(labels), "reduced_kind": kind,
                             "reduced_roles": list(roles)}
    if masked is not None:
        attrs["token_mask_used"] = masked
    return attrs
