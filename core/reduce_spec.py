"""Reading reduction specs: ``"last:topk(8)"`` -> steps, and ``"output:last,attention"`` ->
kind specs. What the steps mean and how they are applied: :mod:`.reduce`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CaptureError
from .naming import DECODER_PREFIX

#: steps that pick positions along a token axis, and those that reduce an axis
POSITIONS = ("last", "first", "slice", "mask")
REDUCERS = ("mean", "norm", "topk")
TOKEN_AXES = ("token", "query", "key")
_STEP = re.compile(r"^([a-z]+)(?:\((.*)\))?$")
_AXIS = re.compile(r"^[a-z][a-z0-9_]*$")

Chain = tuple["Step", ...]
FULL: Chain = ()


@dataclass(frozen=True)
class Step:
    """One step of a chain: its name, the axis it was asked for (None: the default) and its
    argument (a slice's start and stop, topk's k)."""

    name: str
    axis: str | None = None
    start: int | None = None
    stop: int | None = None
    k: int | None = None

    @property
    def length(self) -> int:
        """How many positions a slice takes (1 for last and first)."""
        start, stop = self.start or 0, self.stop
        return (stop if stop is not None else 0) - start

    def argument(self) -> str:
        if self.name == "slice":
            stop = "" if self.stop is None else str(self.stop)
            return f"{self.start}:{stop}"
        return str(self.k) if self.name == "topk" else ""

    def text(self, axis: str | None = None) -> str:
        """``last``, ``topk(8)`` as asked; with ``axis``, as stored: ``topk(hidden,8)``."""
        parts = [a for a in (axis or self.axis, self.argument()) if a]
        return f"{self.name}({','.join(parts)})" if parts else self.name


def split_specs(text: str) -> list[str]:
    """``"output:topk(hidden,8),attention"`` -> its specs, split at commas outside brackets."""
    return [s for s in _split_outside_brackets(text, ",") if s]


def _split_outside_brackets(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` where no bracket is open, each part stripped."""
    parts, depth, current = [], 0, ""
    for char in text.strip():
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def spec_kind(spec: str) -> str:
    """The kind a spec takes (``output`` of ``output:last``)."""
    return spec.partition(":")[0].strip()


def parse_chain(text: str) -> Chain:
    """``"last:topk(8)"`` -> its steps; raises :class:`CaptureError` saying what is wrong."""
    steps = tuple(parse_step(part) for part in _split_steps(text))
    for step in steps[:-1]:
        if step.name == "topk":
            raise CaptureError(f"{text!r}: topk must be the last step of a chain (it makes two "
                               "variables, values and indices)")
    return steps


def _split_steps(text: str) -> list[str]:
    parts = _split_outside_brackets(text, ":")
    if not all(parts):
        raise CaptureError(f"{text!r} has an empty step; write steps as 'last:topk(8)'")
    return parts


def parse_step(text: str) -> Step:
    match = _STEP.match(text.replace(" ", ""))
    known = ", ".join((*POSITIONS, *REDUCERS))
    if match is None or match.group(1) not in (*POSITIONS, *REDUCERS):
        raise CaptureError(f"unknown reduction {text!r}: use {known} (e.g. 'last', "
                           "'mean(token)', 'slice(0:4)', 'topk(hidden,8)')")
    name, inner = match.group(1), match.group(2)
    args = inner.split(",") if inner else []
    axis = args.pop(0) if args and _AXIS.match(args[0]) else None
    if axis is not None and name in (*POSITIONS, "mean") and \
            axis.removeprefix(DECODER_PREFIX) not in TOKEN_AXES:
        raise CaptureError(f"{text!r}: {name} works on a token axis ({', '.join(TOKEN_AXES)}), "
                           f"e.g. '{name}(token)'")
    if name == "slice":
        if len(args) != 1:
            raise CaptureError(f"{text!r}: a slice takes positions, e.g. 'slice(0:4)'")
        start, stop = parse_slice(args[0], text)
        return Step(name, axis, start=start, stop=stop)
    if name == "topk":
        if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
            raise CaptureError(f"{text!r}: topk takes a count of at least 1, e.g. 'topk(8)'")
        return Step(name, axis, k=int(args[0]))
    if args:
        raise CaptureError(f"{text!r}: {name} takes at most an axis name, e.g. '{name}(token)'")
    if name in ("last", "first"):
        return Step(name, axis, start=-1 if name == "last" else 0,
                    stop=None if name == "last" else 1)
    return Step(name, axis)


def parse_slice(text: str, where: str) -> tuple[int, int | None]:
    """``"0:4"``, ``"-4:"``, ``"-8:-4"`` -> (start, stop): a fixed number of positions."""
    start_text, sep, stop_text = text.partition(":")
    try:
        start = int(start_text) if start_text else 0
        stop = int(stop_text) if stop_text else None
    except ValueError:
        start, stop, sep = 0, None, ""
    fixed = (start >= 0 and stop is not None and stop > start) or \
        (start < 0 and (stop is None or start < stop <= -1))
    if not sep or not fixed:
        raise CaptureError(
            f"{where!r}: a slice takes a fixed number of positions: 'a:b' with 0 <= a < b "
            "(from each sample's first real token) or '-a:' / '-a:-b' (from its last)")
    return start, stop


def positions_text(positions: str | slice | None) -> str | None:
    """The ``positions=`` argument as a step: ``"last"``, ``slice(0, 4)`` -> ``"slice(0:4)"``."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        if positions.step not in (None, 1):
            raise CaptureError(f"positions={positions!r}: a slice with a step is not supported")
        start = "" if positions.start is None else str(positions.start)
        stop = "" if positions.stop is None else str(positions.stop)
        positions = f"slice({start}:{stop})"
    if ":" in positions and not positions.startswith("slice"):
        positions = f"slice({positions})"
    step = parse_step(positions)
    if step.name not in POSITIONS:
        raise CaptureError(f"positions={positions!r}: use one of {', '.join(POSITIONS)} or a "
                           "slice; reductions go in reduce=")
    return positions


def default_chains(positions: str | None, reduce: Sequence[str]) -> tuple[Chain, ...]:
    """The chains ``positions=`` and ``reduce=`` ask for at a kind named without steps."""
    head = parse_chain(positions) if positions else FULL
    for text in reduce:
        if text and parse_chain(text)[0].name in POSITIONS:
            raise CaptureError(f"reduce={text!r} picks positions: pass it as positions=")
    if not reduce:
        return (head,)
    return tuple(head + parse_chain(text) for text in reduce)
