"""Argument types of the subcommands: numbers checked against their range while argparse
parses, so a bad value is one line naming the option and the allowed range (exit 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: the ranges of the numeric options (inclusive); a rendering past them would exhaust memory
#: or take hours rather than draw anything useful
MAX_BATCH_SIZE = 1 << 16
MAX_TOKENS = 1_000_000
MAX_CELLS = 10_000
MAX_TOP_K = 100
MAX_BINS = 10_000
DPI_RANGE = (10, 1200)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound when ``high`` is None)."""
    allowed = f"{low}..{high}" if high is not None else f"{low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number; pass an integer ({allowed})"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; pass {allowed}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def tolerance(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; pass a finite number >= 0 (e.g. 1e-5)"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range; pass a finite number >= 0")
    return value


index = integer(0)  # a sample, layer, head, channel or neuron: 0 or more
