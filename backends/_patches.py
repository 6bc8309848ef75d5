"""Functions wrapped for as long as a trace needs them, by traces that may overlap in any order.

Attention taps wrap framework functions (``torch.softmax``, ``jax.nn.softmax``, …) that are
global to the process. Two traces open at once on two threads end in any order; had each
saved the attribute it found and put it back, the first to close would restore the true
function under the other's wrapper and the other would restore its neighbour's wrapper,
left in place for good. Here each attribute has one registry: the chain of wrappers of the
traces open now, composed over the true original, rebuilt whenever a trace joins or leaves,
and the true original put back (or the class's own attribute removed) once the last leaves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Makes a wrapper from the function it is to call on (the true original or another wrapper).
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass
class _Patched:
    """One attribute while at least one trace wraps it."""

    original: Any
    own: bool  # whether the attribute lay in the owner's own ``__dict__`` (not inherited)
    wraps: list[Wrap] = field(default_factory=list)  # in the order the traces joined


_LOCK = threading.Lock()
_PATCHED: dict[tuple[int, str], _Patched] = {}


def original(owner: Any, name: str) -> Any:
    """The attribute as it is when no trace wraps it."""
    with _LOCK:
        patched = _PATCHED.get((id(owner), name))
        return getattr(owner, name) if patched is None else patched.original


def _install(owner: Any, name: str, patched: _Patched) -> None:
    function = patched.original
    for wrap in patched.wraps:
        function = wrap(function)
    setattr(owner, name, function)


@contextmanager
def wrapped(owner: Any, name: str, wrap: Wrap) -> Iterator[None]:
    """``owner.name`` wrapped by ``wrap`` (and by the other open traces' wrappers) for the
    block; the true original is back once no block wraps it, whatever order they end in."""
    key = (id(owner), name)
    with _LOCK:
        patched = _PATCHED.get(key)
        if patched is None:
            own = name in getattr(owner, "__dict__", {})
            patched = _PATCHED[key] = _Patched(getattr(owner, name), own)
        patched.wraps.append(wrap)
        try:
            _install(owner, name, patched)
        except BaseException:  # the attribute is as it was: only the registry is undone
            _unregister(key, patched, wrap)
            raise
    try:
        yield
    finally:
        with _LOCK:
            if _unregister(key, patched, wrap):
                _install(owner, name, patched)
            elif patched.own:
                setattr(owner, name, patched.original)
            else:
                delattr(owner, name)  # inherited again, as before the first trace


def _unregister(key: tuple[int, str], patched: _Patched, wrap: Wrap) -> bool:
    """Take ``wrap`` off the registry (with the lock held); whether other blocks still wrap
    the attribute (if none, its entry is gone)."""
    patched.wraps.remove(wrap)
    if patched.wraps:
        return True
    del _PATCHED[key]
    return False
