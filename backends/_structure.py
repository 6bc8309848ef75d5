"""Walking nested model outputs, shared by every backend: which tensor sits where, and the
kind name each one gets (``output``, ``output.1``, ``output.logits``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Path = tuple[str, ...]


def leaves(value: Any, is_leaf: Callable[[Any], bool],
           path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every leaf in tuples, lists, dicts and dataclasses, in their order."""
    if is_leaf(value):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from leaves(item, is_leaf, (*path, str(key)))
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from leaves(item, is_leaf, (*path, str(index)))
    elif value is not None and hasattr(value, "__dataclass_fields__"):
        for key in value.__dataclass_fields__:
            yield from leaves(getattr(value, key, None), is_leaf, (*path, key))


def part_kind(base: str, path: Path) -> str:
    """``output`` for a lone tensor or element 0, ``output.1`` / ``output.<key>`` otherwise."""
    if not path or path == ("0",):
        return base
    return ".".join((base, *path))
