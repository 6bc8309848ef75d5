"""Variable names and the shared dimension vocabulary.

A captured tensor becomes the variable ``<site>@<kind>``. ``site`` is the framework's own
module path (dots); ``kind`` says what was taken there (``output``, ``input``, ``attention``,
``grad`` or a reduction name, with a ``.<part>`` suffix for one element of a tuple or dict).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CaptureError

SEPARATOR = "@"
ROOT_SITE = "root"

#: Dimension names every backend uses; a trace from any framework speaks this vocabulary.
VOCABULARY = (
    "batch", "token", "hidden", "head", "query", "key", "neuron",
    "channel", "height", "width", "depth", "time",
)
BASE_KINDS = ("output", "input", "attention", "grad")

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_FORBIDDEN = re.compile(r"[/\\]")


@dataclass(frozen=True)
class VariableName:
    site: str
    kind: str

    def __str__(self) -> str:
        return f"{self.site}{SEPARATOR}{self.kind}"


def variable_name(site: str, kind: str) -> str:
    """Return the store name of the tensor taken as ``kind`` at ``site``."""
    site = site or ROOT_SITE
    if _FORBIDDEN.search(site) or _FORBIDDEN.search(kind) or SEPARATOR in site:
        raise CaptureError(
            f"site {site!r} / kind {kind!r} contains '/', '\\' or '@'; "
            "rename the module or choose another kind"
        )
    return f"{site}{SEPARATOR}{kind}"


def parse_variable_name(name: str) -> VariableName:
    """Split ``<site>@<kind>``; raises for names that are coordinates, not captures."""
    site, sep, kind = name.rpartition(SEPARATOR)
    if not sep or not site:
        raise CaptureError(f"{name!r} is not a captured variable (expected '<site>@<kind>')")
    return VariableName(site, kind)


def is_capture(name: str) -> bool:
    return SEPARATOR in name


def layer_index(site: str) -> int | None:
    """The first number in a dotted path: the index of a repeated block (``encoder.layer.3``)."""
    match = _LAYER_NUMBER.search(site)
    return int(match.group(1)) if match else None


class DimRegistry:
    """Keeps one size per dimension name so every variable fits in one xarray Dataset.

    A role that arrives with a second size (a 2-unit classifier beside 384-wide hidden states)
    is stored as ``<role>_<size>``; the plain role stays in the variable's ``roles`` attribute,
    so readers can still line dims up by role.
    """

    def __init__(self, known: dict[str, int] | None = None) -> None:
        self.sizes: dict[str, int] = dict(known or {})

    def resolve(self, roles: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, ...]:
        if len(roles) != len(shape):
            raise CaptureError(f"dims {roles} do not match shape {shape}")
        names: list[str] = []
        for role, size in zip(roles, shape, strict=True):
            names.append(role if role == "batch" else self._free_name(role, size, names))
        return tuple(names)

    def _free_name(self, role: str, size: int, taken: list[str]) -> str:
        candidates = [role, f"{role}_{size}", *(f"{role}_{size}_{i}" for i in range(2, 64))]
        for name in candidates:
            if name not in taken and self.sizes.get(name, size) == size:
                self.sizes.setdefault(name, size)
                return name
        raise CaptureError(f"cannot name a {role!r} axis of size {size}: too many variants")


def default_roles(ndim: int) -> tuple[str, ...]:
    """Role names for a tensor nobody described: batch first, then positional axes."""
    if ndim == 0:
        raise CaptureError("a scalar has no batch axis; capture a tensor with a batch dimension")
    return ("batch",) + tuple(f"axis{i}" for i in range(1, ndim))
