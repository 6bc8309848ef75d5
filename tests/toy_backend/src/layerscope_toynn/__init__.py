"""The layerscope backend for toynn, written from layerscope's public contract only
(``layerscope.backends.base``) and registered through the ``layerscope.backends`` entry point.

Hooks: while attached, ``__call__`` is wrapped on every class the model's modules use; a call
on one of the model's modules (found by identity) is captured under its path. The model's own
call opens and closes the pass. Attention probabilities are the output of the ``softmax`` child
of a ``SelfAttention``, stored under the attention module's site. Importing this module does
not import toynn (``detect`` loads every plugin); toynn is imported by the methods that get a
model, which means it is imported already.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from layerscope.backends.base import Backend
from layerscope.core import Recorder, Selection, SiteInfo
from layerscope.core.naming import (
    ROOT_SITE,
    default_roles,
    feature_role,
    hidden_size_of,
    move_batch_first,
)
from layerscope.core.writerecords import Alloc


def _toynn() -> Any:
    import toynn

    return toynn


def snapshot(array: np.ndarray, alloc: Alloc) -> np.ndarray:
    """Copy now, into the writer's memory: a later in-place op (``ReLU(inplace=True)``) must
    not change what was captured."""
    host = alloc(tuple(array.shape), array.dtype)
    np.copyto(host, array)
    return host


def to_numpy(held: Any) -> np.ndarray:
    """Runs on writer threads: the snapshot already is a NumPy array."""
    return np.asarray(held)


def roles_for(module: Any, kind: str, ndim: int, width: int,
              hidden_size: int | None) -> tuple[str, ...]:
    toynn = _toynn()
    if kind == "attention" or (isinstance(module, toynn.Softmax) and ndim == 4):
        return ("batch", "head", "query", "key") if ndim == 4 else default_roles(ndim)
    if isinstance(module, toynn.RNN) and kind == "output" and ndim == 3:
        return ("token", "batch", "hidden") if module.time_major else ("batch", "token", "hidden")
    if ndim == 4:  # toynn is channels-first
        return ("batch", "channel", "height", "width")
    if ndim == 3:
        return ("batch", "token", feature_role(width, hidden_size))
    if ndim == 2:
        return ("batch", feature_role(width, hidden_size))
    return ("batch",) if ndim == 1 else default_roles(ndim)


def _parts(base: str, value: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(kind, array) for an array or the arrays of a tuple: ``output``, ``output.1``, ..."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray) and item.ndim > 0:
            yield (base if index == 0 else f"{base}.{index}"), item


def _call_owner(cls: type) -> type | None:
    return next((k for k in cls.__mro__ if "__call__" in k.__dict__ and k is not object), None)


class _Capture:
    """The wrappers of one ``attach`` block and what they share."""

    def __init__(self, model: Any, selection: Selection, recorder: Recorder) -> None:
        toynn = _toynn()
        self.model = model
        self.recorder = recorder
        self.hidden_size = hidden_size_of(model)
        modules = list(model.named_modules())
        self.sites = {id(m): path or ROOT_SITE for path, m in modules}
        #: id(softmax) -> the site of the attention module it belongs to
        self.attention = {
            id(m.softmax): path or ROOT_SITE for path, m in modules
            if isinstance(m, toynn.SelfAttention) and selection.wants("attention", path or ROOT_SITE)
        }
        self.inputs = {site for site in self.sites.values() if selection.wants("input", site)}
        self.outputs = {site for site in self.sites.values() if selection.wants("output", site)}
        self._keep = [m for _, m in modules]  # ids stay valid while attached
        owners = (_call_owner(type(m)) for m in self._keep)
        self.classes = list(dict.fromkeys(k for k in owners if k is not None))
        self.depth = 0

    def put(self, site: str, kind: str, module: Any, array: np.ndarray) -> None:
        roles = roles_for(module, kind, array.ndim, int(array.shape[-1]), self.hidden_size)
        array, roles = move_batch_first(array, roles)
        self.recorder.put(site, kind, array, roles, type(module).__name__, to_numpy, snapshot)

    def layer(self, module: Any, call: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        site = self.sites[id(module)]
        if site in self.inputs:
            for kind, array in _parts("input", args):
                self.put(site, kind, module, array)
        out = call(module, *args, **kwargs)
        if site in self.outputs:
            for kind, array in _parts("output", out):
                self.put(site, kind, module, array)
        attention = self.attention.get(id(module))
        if attention is not None and isinstance(out, np.ndarray):
            self.put(attention, "attention", module, out)
        return out

    def root(self, module: Any, call: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        first = next((a for a in args if isinstance(a, np.ndarray) and a.ndim >= 1), None)
        if first is None:
            return call(module, *args, **kwargs)
        ids = first if first.ndim == 2 and first.dtype.kind in "iu" else None
        recorder = self.recorder
        if recorder.in_pass:
            recorder.abort_pass()
        recorder.begin_pass(int(first.shape[0]), ids)
        self.depth += 1
        try:
            out = self.layer(module, call, args, kwargs)
        except BaseException:
            recorder.abort_pass()
            raise
        finally:
            self.depth -= 1
        recorder.end_pass()
        return out

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def __call__(module: Any, *args: Any, **kwargs: Any) -> Any:
            if id(module) not in self.sites:
                return original(module, *args, **kwargs)  # a module of another model
            if self.depth == 0:
                if module is self.model:
                    return self.root(module, original, args, kwargs)
                return original(module, *args, **kwargs)  # a part called on its own
            return self.layer(module, original, args, kwargs)

        return __call__

    @contextmanager
    def installed(self) -> Iterator[None]:
        replaced: list[tuple[type, Any]] = []
        try:
            for cls in self.classes:
                original = cls.__dict__["__call__"]
                replaced.append((cls, original))
                type.__setattr__(cls, "__call__", self.wrap(original))
            yield
        finally:
            for cls, original in reversed(replaced):
                type.__setattr__(cls, "__call__", original)
            if self.recorder.in_pass:
                self.recorder.abort_pass()


class ToyBackend:
    name = "numpy"
    extra = "layerscope-toynn"

    def can_handle(self, model: Any) -> bool:
        toynn = sys.modules.get("toynn")
        return toynn is not None and isinstance(model, toynn.Module)

    def sites(self, model: Any) -> list[SiteInfo]:
        toynn = _toynn()
        return [SiteInfo(path or ROOT_SITE, type(m).__name__, isinstance(m, toynn.SelfAttention))
                for path, m in model.named_modules()]

    @contextmanager
    def attach(self, model: Any, selection: Selection, recorder: Recorder) -> Iterator[None]:
        with _Capture(model, selection, recorder).installed():
            yield

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return np.array(tensor, copy=True)

    def framework_version(self) -> str:
        return f"toynn {_toynn().__version__} (numpy {np.__version__})"

    def describe(self, model: Any) -> dict[str, Any]:
        return {"class": f"{type(model).__module__}.{type(model).__qualname__}"}

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def convert(value: Any) -> Any:  # toynn computes in float32
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                return value.astype(np.float32, copy=False)
            return value

        return model(*(convert(a) for a in args), **{k: convert(v) for k, v in kwargs.items()})


BACKEND: Backend = ToyBackend()
