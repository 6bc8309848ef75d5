"""Which sites to capture: glob patterns on dotted module paths, plus the kinds to take."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_KINDS = ("output", "attention")


@dataclass(frozen=True)
class Selection:
    """Glob patterns (``encoder.layer.*.attention*``) on site paths and the kinds to keep.

    An empty ``include`` means every site. ``exclude`` wins over ``include``.
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

    def matches(self, site: str) -> bool:
        if any(fnmatch.fnmatchcase(site, p) for p in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(site, p) for p in self.include)

    def wants(self, kind: str) -> bool:
        return kind.split(".", 1)[0] in self.kinds

    def to_json(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude), "kinds": list(self.kinds)}


@dataclass(frozen=True)
class SiteInfo:
    """One capturable place in a model, as a backend reports it."""

    path: str
    module_type: str
    is_attention: bool = False
    extra: dict[str, object] = field(default_factory=dict, compare=False)
