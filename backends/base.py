"""The backend protocol: what a framework adapter must provide. Small on purpose.

A backend knows one framework and nothing about storage. Inside ``attach`` it installs hooks
that call ``recorder.begin_pass`` / ``recorder.put(site, kind, tensor, roles, module_type,
to_numpy)`` / ``recorder.end_pass`` (batch axis first), and it ALWAYS removes them on exit,
including after exceptions and KeyboardInterrupt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from layerscope.core import Recorder, Selection, SiteInfo


class Backend(Protocol):
    name: str
    #: the pip extra that installs this backend's framework
    extra: str

    def can_handle(self, model: Any) -> bool:
        """True for models of this framework; must not import the framework to decide."""

    def sites(self, model: Any) -> list[SiteInfo]:
        """The capturable places of ``model``, in definition order."""

    def attach(self, model: Any, selection: Selection,
               recorder: Recorder) -> AbstractContextManager[None]:
        """Install capture hooks for the duration of a ``with`` block."""

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor`` with its dtype kept (bfloat16 widened to float32 exactly)."""

    def framework_version(self) -> str: ...

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``model`` once, turning NumPy arrays in ``args``/``kwargs`` into its tensors."""

    # Optional: ``adapt_tokenizer(tokenizer, model)`` turns a framework's own tokenizer into
    # one ``capture`` can call like a Hugging Face tokenizer (keras-hub does this).

    def describe(self, model: Any) -> dict[str, Any]:
        """JSON-able description of the model: its class and, where known, its name."""


def model_module(model: Any) -> str:
    """The top-level package that defined ``model``'s class (``torch``, ``keras``, ``flax``)."""
    return type(model).__module__.split(".", 1)[0]


def class_mro_modules(model: Any) -> Iterator[str]:
    for cls in type(model).__mro__:
        yield cls.__module__.split(".", 1)[0]
