"""Which sites to capture: glob patterns on dotted module paths, plus the kinds to take."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_KINDS = ("output", "attention")


@dataclass(frozen=True)
class Selection:
    """Glob patterns (``encoder.layer.*.attention*``) on site paths and the kinds to keep.

    A pattern may end in ``@kind[,kind]`` to take only those kinds where it matches
    (``"*.attention.self@attention"``, ``"encoder.layer.[0-9]@output"``); a pattern without
    one takes ``kinds``. An empty ``include`` means every site. ``exclude`` wins over include.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = DEFAULT_KINDS

    @classmethod
    def of(
        cls,
        capture: str | Sequence[str] | Selection | None = None,
        kinds: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
    ) -> Selection:
        if isinstance(capture, Selection):
            return capture
        include: tuple[str, ...] = (capture,) if isinstance(capture, str) else tuple(capture or ())
        return cls(include, tuple(exclude), tuple(kinds) if kinds else DEFAULT_KINDS)

    def _rules(self) -> list[tuple[str, tuple[str, ...]]]:
        rules = []
        for pattern in self.include or ("*",):
            glob, sep, kinds = pattern.partition("@")
            rules.append((glob, tuple(k.strip() for k in kinds.split(",")) if sep else self.kinds))
        return rules

    def _excluded(self, site: str) -> bool:
        return any(fnmatch.fnmatchcase(site, p) for p in self.exclude)

    def matches(self, site: str) -> bool:
        return not self._excluded(site) and any(
            fnmatch.fnmatchcase(site, glob) for glob, _ in self._rules()
        )

    def wants(self, kind: str, site: str | None = None) -> bool:
        """Whether ``kind`` is taken at ``site`` (at any site when ``site`` is None)."""
        base = kind.split(".", 1)[0]
        if site is not None and self._excluded(site):
            return False
        return any(
            base in kinds and (site is None or fnmatch.fnmatchcase(site, glob))
            for glob, kinds in self._rules()
        )

    def to_json(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude), "kinds": list(self.kinds)}


@dataclass(frozen=True)
class SiteInfo:
    """One capturable place in a model, as a backend reports it."""

    path: str
    module_type: str
    is_attention: bool = False
    extra: dict[str, object] = field(default_factory=dict, compare=False)
