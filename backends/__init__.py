"""layerscope.backends: framework adapters, picked from the model object.

Built-in backends load lazily: importing this package imports no framework. The Keras 3
backend is registered as ``tensorflow`` (its first framework) and also answers to ``keras`` and
to its own name, ``keras/<backend>``, the backend Keras runs on in this process. Third parties
register more under the entry point group ``layerscope.backends`` (the contract, and how to
register: :mod:`layerscope.backends.base`; the conformance suite: :mod:`layerscope.testing`).
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from typing import Any

from layerscope.core import BackendError
from layerscope.core.userwarn import warn_user

from .base import (
    Backend,
    FolderLoader,
    TokenizerAdapter,
    class_mro_modules,
    folder_loader,
    tokenizer_adapter,
)

#: the entry point group third-party backends register under
GROUP = "layerscope.backends"
_MEMBERS = ("name", "extra", "can_handle", "sites", "attach", "to_numpy", "framework_version",
            "describe", "run")

#: name -> (module path, pip extra, top-level packages whose objects it may handle)
BUILTIN: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torch": ("layerscope.backends.torch", "torch", ("torch",)),
    "tensorflow": ("layerscope.backends.tensorflow", "tensorflow",
                   ("keras", "tensorflow", "tf_keras", "keras_hub")),
    "jax": ("layerscope.backends.jax", "jax", ("flax", "jax", "jaxlib")),
}
#: other names of a built-in backend
ALIASES = {"keras": "tensorflow", "keras/tensorflow": "tensorflow", "keras/jax": "tensorflow",
           "keras/torch": "tensorflow"}
#: built-ins ``detect`` asks before the others: on Keras's PyTorch backend a Keras model is
#: also a ``torch.nn.Module`` whose submodules hide its layers
_DETECT_FIRST = ("tensorflow",)
_loaded: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (or one of its :data:`ALIASES`); raises with the extra to
    install when it cannot load."""
    backend = _get(ALIASES.get(name, name))
    if name.startswith("keras/") and backend.name != name:
        raise BackendError(
            f"backend {name!r}: Keras runs on {backend.name!r} in this process; Keras picks "
            "its backend once, from KERAS_BACKEND set before keras is imported"
        )
    return backend


def _get(name: str) -> Backend:
    if name in _loaded:
        return _loaded[name]
    if name in BUILTIN:
        module_path, extra, _ = BUILTIN[name]
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise BackendError(
                f"the {name} backend needs its framework: pip install 'layerscope[{extra}]' ({exc})"
            ) from exc
        backend: Backend = module.BACKEND
    else:
        backend = _load_plugin(name)
    _loaded[name] = backend
    return backend


def _load_plugin(name: str) -> Backend:
    plugins = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in plugins:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(available())}")
    entry = plugins[name]
    try:
        loaded = entry.load()
    except Exception as exc:  # a plugin's import may fail in any way; say which plugin
        raise BackendError(
            f"the {name} backend (entry point {entry.value!r} in group {GROUP!r}) failed to "
            f"load: {type(exc).__name__}: {exc}"
        ) from exc
    backend = loaded() if isinstance(loaded, type) else loaded
    if not isinstance(backend, Backend):
        missing = [m for m in _MEMBERS if not hasattr(backend, m)]
        raise BackendError(
            f"the {name} backend ({entry.value!r}) is not a layerscope backend: it lacks "
            f"{', '.join(missing)} (see layerscope.backends.base.Backend)"
        )
    if backend.name != name:
        raise BackendError(
            f"the entry point {name!r} ({entry.value!r}) gives a backend named "
            f"{backend.name!r}; name the entry point after the backend"
        )
    return backend


def available() -> list[str]:
    """Names of the built-in backends, then of the installed plugins (entry point group
    ``layerscope.backends``), whether or not their frameworks are installed."""
    plugins = [ep.name for ep in entry_points(group=GROUP)]
    return list(BUILTIN) + sorted(set(plugins) - set(BUILTIN))


def detect(model: Any) -> Backend:
    """Pick the backend whose framework defined ``model``, importing only that framework."""
    roots = set(class_mro_modules(model))
    loaded = set(sys.modules)
    names = available()
    for name in [n for n in _DETECT_FIRST if n in names] + [n for n in names
                                                            if n not in _DETECT_FIRST]:
        if name in BUILTIN and not (roots | loaded) & set(BUILTIN[name][2]):
            continue  # that framework is not even imported: it cannot have made this model
        try:
            backend = get_backend(name)
        except BackendError as exc:
            if name not in BUILTIN:  # an installed plugin that is broken: say so, go on
                warn_user(f"layerscope: {exc}")
            continue
        if backend.can_handle(model):
            return backend
    raise BackendError(
        f"no backend handles a {type(model).__module__}.{type(model).__qualname__}; installed "
        f"backends: {', '.join(available())}. Pass a torch.nn.Module, a keras.Model or a Flax "
        "module (pip install 'layerscope[torch]' / '[tensorflow]' / '[jax]'), or backend=NAME."
    )


__all__ = ["ALIASES", "BUILTIN", "GROUP", "Backend", "FolderLoader", "TokenizerAdapter", "available",
           "detect", "folder_loader", "get_backend", "tokenizer_adapter"]
