"""A piece of one batch's variable: written where it belongs, not as whole samples.

A backend that computes a variable in pieces (``generate()``: the prompt's positions, then one
position per step) hands each piece to the writer as it comes, so that memory holds a piece,
not the whole variable. ``shape`` is the variable's full shape per sample in this pass (what
the token axes grow to), ``offset`` where the piece starts along each axis past ``batch``.
Positions past the last piece along an axis read as the variable's fill value, as past a
shorter pass's end; before it, every chunk must have been written (a piece may hold fill
values): the checked reader takes a chunk missing among written ones for damage.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Region:
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    #: {axis past batch: chunk length} for an array the piece creates: the axis written piece
    #: by piece, chunked at the pieces' length so that a piece fills whole chunks
    chunks: dict[int, int] = field(default_factory=dict)

    def slices(self, piece: tuple[int, ...]) -> tuple[slice, ...]:
        """Where a piece of per-sample shape ``piece`` goes."""
        return tuple(slice(start, start + n) for start, n in zip(self.offset, piece, strict=True))
