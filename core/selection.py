"""Which sites to capture: glob patterns on dotted module paths, plus the kinds to take."""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .reduce_spec import (
    FULL,
    Chain,
    default_chains,
    parse_chain,
    positions_text,
    spec_kind,
    split_specs,
)

DEFAULT_KINDS = ("output", "attention")


@dataclass(frozen=True)
class Selection:
    """Glob patterns (``encoder.layer.*.attention*``) on site paths and the kinds to keep.

    A pattern may end in ``@kind[,kind]`` to take only those kinds where it matches
    (``"*.attention.self@attention"``, ``"encoder.layer.[0-9]@output"``); a pattern without
    one takes ``kinds``. An empty ``include`` means every site. ``exclude`` wins over include.

    A kind may carry reduction steps (``"model.layers.*@output:last"``,
    ``"*.mlp@output:topk(8)"``; see :mod:`.reduce`): that variable is then stored reduced,
    not whole. ``positions`` and ``reduce`` add steps to every kind named without any.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = DEFAULT_KINDS
    #: a positions step (``last``, ``slice(0:4)``) for kinds named without steps
    positions: str | None = None
    #: reductions (``mean``, ``norm``, ``topk(8)``) for kinds named without steps, one each
    reduce: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for spec in self.specs():  # every step is parsed now: a typo fails before a run
            steps = spec.partition(":")[2]
            if steps:
                parse_chain(steps)
        default_chains(self.positions, self.reduce)

    @classmethod
    def of(
        cls,
        capture: str | Sequence[str] | Selection | None = None,
        kinds: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        positions: str | slice | None = None,
        reduce: str | Sequence[str] | None = None,
    ) -> Selection:
        steps = positions_text(positions)
        reductions = (reduce,) if isinstance(reduce, str) else tuple(reduce or ())
        if isinstance(capture, Selection):
            if steps is not None:
                capture = replace(capture, positions=steps)
            return replace(capture, reduce=reductions) if reductions else capture
        include: tuple[str, ...] = (capture,) if isinstance(capture, str) else tuple(capture or ())
        return cls(include, tuple(exclude), tuple(kinds) if kinds else DEFAULT_KINDS,
                   steps, reductions)

    @functools.cached_property
    def _rules(self) -> list[tuple[str, tuple[str, ...]]]:
        """(glob, specs): a spec is a kind, with its steps where it has any (``output:last``)."""
        rules = []
        for pattern in self.include or ("*",):
            glob, sep, kinds = pattern.partition("@")
            rules.append((glob, tuple(split_specs(kinds)) if sep else
                          tuple(s for k in self.kinds for s in split_specs(k))))
        return rules

    @functools.cached_property
    def _defaults(self) -> tuple[Chain, ...]:
        return default_chains(self.positions, self.reduce)

    def specs(self) -> list[str]:
        """Every kind spec the selection names (``output``, ``output:last``)."""
        return [spec for _, specs in self._rules for spec in specs]

    def chains(self, kind: str, site: str) -> tuple[Chain, ...]:
        """What to store of ``kind`` at ``site``: one chain of steps per variable, the empty
        chain :data:`~.reduce.FULL` for the whole tensor; none when it is not taken."""
        base = kind.split(".", 1)[0]
        known = self._chains.get((base, site))
        if known is None:
            known = self._chains[(base, site)] = self._find_chains(base, site)
        return known

    @functools.cached_property
    def _chains(self) -> dict[tuple[str, str], tuple[Chain, ...]]:
        return {}  # (kind, site) -> chains, found once: puts ask for every tensor

    def _find_chains(self, base: str, site: str) -> tuple[Chain, ...]:
        if self._excluded(site):
            return ()
        found: list[Chain] = []
        for glob, specs in self._rules:
            if not fnmatch.fnmatchcase(site, glob):
                continue
            for spec in specs:
                taken, _, steps = spec.partition(":")
                if taken.strip() == base:
                    found.extend(self._defaults if not steps else (parse_chain(steps),))
        return tuple(dict.fromkeys(found))

    @functools.cached_property
    def reduces(self) -> bool:
        """Whether any variable may be stored reduced rather than whole."""
        return self._defaults != (FULL,) or any(":" in spec for spec in self.specs())

    def _excluded(self, site: str) -> bool:
        return any(fnmatch.fnmatchcase(site, p) for p in self.exclude)

    def matches(self, site: str) -> bool:
        return not self._excluded(site) and any(
            fnmatch.fnmatchcase(site, glob) for glob, _ in self._rules
        )

    def wants(self, kind: str, site: str | None = None) -> bool:
        """Whether ``kind`` is taken at ``site`` (at any site when ``site`` is None)."""
        base = kind.split(".", 1)[0]
        if site is not None and self._excluded(site):
            return False
        return any(
            any(spec_kind(spec) == base for spec in specs)
            and (site is None or fnmatch.fnmatchcase(site, glob))
            for glob, specs in self._rules
        )

    def to_json(self) -> dict[str, object]:
        described: dict[str, object] = {
            "include": list(self.include), "exclude": list(self.exclude), "kinds": list(self.kinds)}
        if self.positions:
            described["positions"] = self.positions
        if self.reduce:
            described["reduce"] = list(self.reduce)
        return described


@dataclass(frozen=True)
class SiteInfo:
    """One capturable place in a model, as a backend reports it."""

    path: str
    module_type: str
    is_attention: bool = False
    extra: dict[str, object] = field(default_factory=dict, compare=False)
