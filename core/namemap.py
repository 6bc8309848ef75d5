"""Which variable of trace A goes with which variable of trace B.

Two ways to pair the captured variables of two traces:

* an explicit **name map**: ordered rules ``pattern in A -> pattern in B``, given as a dict or
  as a small JSON / YAML file (see :func:`load_name_map`);
* an **automatic** match: identical names first, then the rest lined up in execution order
  (variable attr ``order``), pairing only variables of the same kind whose dims have the same
  roles and sizes (attr ``roles``), whatever their layout. This is exact for two traces of
  one model structure (the same framework, or layer-for-layer ports such as a CNN in PyTorch
  and Keras); where one framework exposes modules the other fuses (a Dense layer with its
  activation inside), positions shift and a name map says what is what.

Pattern syntax (a rule's two sides):

* ``{n}`` (any name in braces) matches a decimal number, such as a layer index, and the same
  name on the B side writes it back; ``{n+1}`` / ``{n-1}`` shift it (one side counts from 1).
* ``*`` matches any run of characters except ``@``; each ``*`` of the B side receives the text
  of the ``*`` at the same position on the A side.
* A side with ``@`` names whole variables (``encoder.layer.{n}.attention.self@attention``);
  a rule without ``@`` on either side maps sites and keeps the kind
  (``encoder.layer.{n}`` -> ``transformer_layer_{n}`` pairs ``...3@output`` with ``..._3@output``).
* Patterns match the whole name. Rules are tried in order; the first whose B name exists wins.

:func:`line_up` then says how to read a B variable in its partner's layout: axes matched by
dim role (NHWC read as NCHW), or, where one side splits heads the other keeps whole
((batch, token, head, axis3) vs (batch, token, hidden)), trailing axes merged in C order.

A map file holds either the rules themselves (``{"A pattern": "B pattern", ...}``) or
``{"description": "...", "map": {...}}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LayerscopeError
from .format import BATCH
from .naming import SEPARATOR, parse_variable_name, roles_of

_TOKEN = re.compile(r"\{([A-Za-z_]\w*)\}|\*")
_TARGET = re.compile(r"\{([A-Za-z_]\w*)\s*(?:([+-])\s*(\d+))?\}|\*")


class NameMapError(LayerscopeError):
    """A name map is malformed or pairs nothing."""


@dataclass(frozen=True)
class Rule:
    """One ``A pattern -> B pattern`` line of a name map."""

    source: str
    target: str
    whole_name: bool  # False: the rule maps sites and keeps the kind
    regex: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, source: str, target: str) -> Rule:
        if not isinstance(source, str) or not isinstance(target, str) or not source or not target:
            raise NameMapError(
                f"name map rule {source!r}: {target!r} is not a pair of non-empty strings"
            )
        whole = SEPARATOR in source or SEPARATOR in target
        if whole and (SEPARATOR not in source or SEPARATOR not in target):
            raise NameMapError(
                f"name map rule {source!r} -> {target!r}: either both sides name variables "
                f"('<site>@<kind>') or neither does (then the rule maps sites and keeps the kind)"
            )
        names = [m.group(1) for m in _TOKEN.finditer(source) if m.group(1)]
        stars = source.count("*")
        for match in _TARGET.finditer(target):
            if match.group(1) and match.group(1) not in names:
                raise NameMapError(
                    f"name map rule {source!r} -> {target!r}: '{{{match.group(1)}}}' on the right "
                    f"is not captured on the left (left side captures {names or 'nothing'})"
                )
        if target.count("*") > stars:
            raise NameMapError(
                f"name map rule {source!r} -> {target!r}: the right side has more '*' than the left"
            )
        if len(set(names)) != len(names):
            raise NameMapError(f"name map pattern {source!r} captures the same name twice")
        return cls(source, target, whole, re.compile(_to_regex(source)))

    def apply(self, name: str) -> str | None:
        """The B name this rule gives the A variable ``name``, or None when it does not match."""
        if self.whole_name:
            subject, kind = name, ""
        else:
            parsed = parse_variable_name(name)
            subject, kind = parsed.site, parsed.kind
        match = self.regex.fullmatch(subject)
        if match is None:
            return None
        groups = match.groupdict()
        stars = [v for k, v in groups.items() if k.startswith("_star")]
        star_iter = iter(stars)

        def fill(m: re.Match[str]) -> str:
            if m.group(0) == "*":
                return next(star_iter)
            value = int(groups[m.group(1)])
            if m.group(2):
                value += int(m.group(3)) * (1 if m.group(2) == "+" else -1)
            return str(value)

        out = _TARGET.sub(fill, self.target)
        return out if self.whole_name else f"{out}{SEPARATOR}{kind}"


def _to_regex(pattern: str) -> str:
    parts: list[str] = []
    last = 0
    stars = 0
    for match in _TOKEN.finditer(pattern):
        parts.append(re.escape(pattern[last:match.start()]))
        if match.group(0) == "*":
            parts.append(f"(?P<_star{stars}>[^{SEPARATOR}]*?)")
            stars += 1
        else:
            parts.append(f"(?P<{match.group(1)}>\\d+)")
        last = match.end()
    parts.append(re.escape(pattern[last:]))
    return "".join(parts)


@dataclass(frozen=True)
class NameMap:
    """Ordered rules pairing variables of trace A with variables of trace B."""

    rules: tuple[Rule, ...]
    description: str = ""
    origin: str = "<dict>"

    def target(self, name: str, available: Mapping[str, Any] | set[str]) -> tuple[str | None, str]:
        """(B name, rule source) for the A variable ``name``; B name None when no rule fits.

        The rule source is returned too when a rule matched but B lacks its target, so the
        caller can say which rule pointed nowhere.
        """
        missing = ""
        for rule in self.rules:
            out = rule.apply(name)
            if out is None:
                continue
            if out in available:
                return out, rule.source
            missing = missing or f"{rule.source} -> {out}"
        return None, missing


def load_name_map(spec: str | Path | Mapping[str, Any] | NameMap) -> NameMap:
    """A name map from a dict, a JSON file (``.json``) or a YAML file (``.yaml`` / ``.yml``)."""
    if isinstance(spec, NameMap):
        return spec
    origin = "<dict>"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        origin = str(path)
        if not path.is_file():
            raise NameMapError(f"name map {path} does not exist; give a JSON or YAML file")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError as exc:  # pragma: no cover - depends on the environment
                    raise NameMapError(
                        f"reading {path} needs PyYAML (pip install pyyaml); "
                        "or write the map as JSON"
                    ) from exc
                loaded = yaml.safe_load(text)
            else:
                loaded = json.loads(text)
        except NameMapError:
            raise
        except Exception as exc:  # json and yaml raise their own error types
            raise NameMapError(f"name map {path} is not valid JSON/YAML: {exc}") from exc
        spec = loaded
    if not isinstance(spec, Mapping):
        raise NameMapError(
            f"name map {origin} must be a mapping of 'A pattern': 'B pattern' "
            f"(or {{'map': {{...}}}}), not {type(spec).__name__}"
        )
    description = ""
    rules_spec: Any = spec
    if "map" in spec and isinstance(spec["map"], Mapping):
        description = str(spec.get("description", ""))
        rules_spec = spec["map"]
    rules = tuple(Rule.parse(str(k), v) for k, v in rules_spec.items())
    if not rules:
        raise NameMapError(f"name map {origin} has no rules")
    return NameMap(rules, description, origin)


# -- signatures used by the automatic match --------------------------------------------------


def base_kind(name: str) -> str:
    """``output.1`` / ``output.call1`` -> ``output``: the part two frameworks share."""
    try:
        kind = parse_variable_name(name).kind
    except LayerscopeError:
        return name
    return kind.split(".", 1)[0]


def signature(name: str, var: Any) -> tuple[str, tuple[tuple[str, int], ...]]:
    """What the automatic match compares: kind, and role/size pairs whatever the layout.

    ``batch`` is left out of the sizes: two traces of different sample counts still align.
    """
    sizes = tuple(sorted(
        (role, int(n)) for role, n in zip(roles_of(var), var.shape, strict=True) if role != "batch"
    ))
    return base_kind(name), sizes


def align_axes(a: Any, b: Any) -> tuple[tuple[int, ...], str]:
    """For each axis of A, the axis of B with the same role (same occurrence for repeats).

    Returns the B axis order and a note. When the roles differ but the shapes agree position
    by position the axes are paired by position (the note says so); otherwise raises.
    """
    roles_a, roles_b = roles_of(a), roles_of(b)
    if sorted(roles_a) == sorted(roles_b):
        used: list[int] = []
        order: list[int] = []
        for role in roles_a:
            axis = next(i for i, r in enumerate(roles_b) if r == role and i not in used)
            used.append(axis)
            order.append(axis)
        note = ""
        if order != sorted(order):
            note = f"B transposed ({', '.join(roles_b)}) -> ({', '.join(roles_a)})"
        return tuple(order), note
    if len(roles_a) == len(roles_b):
        return tuple(range(len(roles_b))), (
            f"dim roles differ: A ({', '.join(roles_a)}), B ({', '.join(roles_b)}); "
            "compared position by position"
        )
    raise NameMapError(
        f"dims of A ({', '.join(roles_a)}) and B ({', '.join(roles_b)}) cannot be lined up"
    )


def lcs_pairs(a_keys: Sequence[Any], b_keys: Sequence[Any]) -> list[tuple[int, int]]:
    """Index pairs of a longest common subsequence of two key lists (execution orders)."""
    n, m = len(a_keys), len(b_keys)
    if n == 0 or m == 0:
        return []
    # One row of lengths per A item keeps the table at n*m small ints; traces of a few
    # thousand variables each stay well under a second.
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = table[i], table[i + 1]
        key = a_keys[i]
        for j in range(m - 1, -1, -1):
            if key == b_keys[j]:
                row[j] = below[j + 1] + 1
            else:
                row[j] = below[j] if below[j] >= row[j + 1] else row[j + 1]
    pairs: list[tuple[int, int]] = []
    i = j = 0
    while i < n and j < m:
        if a_keys[i] == b_keys[j]:
            pairs.append((i, j))
            i += 1
            j += 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


@dataclass(frozen=True)
class Layout:
    """How to read B in A's layout: B's axis for each of A's leading ``len(axes)`` axes;
    A's remaining axes (if any) are B's remaining axes reshaped in C order."""

    axes: tuple[int, ...]
    shape: tuple[int, ...]  # A's shape, cut to the samples both traces hold
    note: str


def line_up(va: Any, vb: Any, samples: int | None) -> Layout | str:
    """Line B up with A by dim role, else by merging trailing axes; a string says why not."""
    shape_a = [int(n) for n in va.shape]
    shape_b_raw = [int(n) for n in vb.shape]
    if va.dims and va.dims[0] == BATCH and vb.dims and vb.dims[0] == BATCH:
        common = min(shape_a[0], shape_b_raw[0], samples if samples is not None else 1 << 62)
        shape_a[0] = shape_b_raw[0] = common
    try:
        axes, note = align_axes(va, vb)
        shape_b = [shape_b_raw[ax] for ax in axes]
        if shape_a == shape_b:
            return Layout(axes, tuple(shape_a), note)
        reason = (f"shapes differ after lining up dims by role: A {tuple(shape_a)} "
                  f"({', '.join(roles_of(va))}), B {tuple(shape_b)} (in A's order)")
    except NameMapError as exc:
        reason = str(exc)
    # Heads split on one side only, e.g. (batch, token, hidden) vs (batch, token, head, axis3):
    # the shared leading axes line up, the rest hold the same number of values.
    roles_a, roles_b = roles_of(va), roles_of(vb)
    lead = 0
    while (lead < min(len(roles_a), len(roles_b)) and roles_a[lead] == roles_b[lead]
           and shape_a[lead] == shape_b_raw[lead]):
        lead += 1
    if 0 < lead < min(len(roles_a), len(roles_b)) and \
            math.prod(shape_a[lead:]) == math.prod(shape_b_raw[lead:]):
        note = (f"B's ({', '.join(roles_b[lead:])}) {tuple(shape_b_raw[lead:])} reshaped to A's "
                f"({', '.join(roles_a[lead:])}) {tuple(shape_a[lead:])}")
        return Layout(tuple(range(lead)), tuple(shape_a), note)
    return reason
