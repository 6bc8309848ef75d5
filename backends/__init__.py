"""layerscope.backends: framework adapters, picked from the model object.

Built-in backends load lazily: importing this package imports no framework. Third parties
register more under the entry point group ``layerscope.backends``.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from typing import Any

from layerscope.core import BackendError

from .base import Backend, class_mro_modules

#: name -> (module path, pip extra, top-level packages whose objects it may handle)
BUILTIN: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torch": ("layerscope.backends.torch", "torch", ("torch",)),
    "tensorflow": ("layerscope.backends.tensorflow", "tensorflow",
                   ("keras", "tensorflow", "tf_keras", "keras_hub")),
    "jax": ("layerscope.backends.jax", "jax", ("flax", "jax", "jaxlib")),
}
_loaded: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises with the extra to install when it cannot load."""
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
        plugins = {ep.name: ep for ep in entry_points(group="layerscope.backends")}
        if name not in plugins:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(available())}")
        backend = plugins[name].load()
    _loaded[name] = backend
    return backend


def available() -> list[str]:
    plugins = [ep.name for ep in entry_points(group="layerscope.backends")]
    return list(BUILTIN) + sorted(set(plugins) - set(BUILTIN))


def detect(model: Any) -> Backend:
    """Pick the backend whose framework defined ``model``, importing only that framework."""
    roots = set(class_mro_modules(model))
    loaded = set(sys.modules)
    for name in available():
        if name in BUILTIN and not (roots | loaded) & set(BUILTIN[name][2]):
            continue  # that framework is not even imported: it cannot have made this model
        try:
            backend = get_backend(name)
        except BackendError:
            continue
        if backend.can_handle(model):
            return backend
    raise BackendError(
        f"no backend handles a {type(model).__module__}.{type(model).__qualname__}; installed "
        f"backends: {', '.join(available())}. Pass a torch.nn.Module, a keras.Model or a Flax "
        "module (pip install 'layerscope[torch]' / '[tensorflow]' / '[jax]'), or backend=NAME."
    )


__all__ = ["BUILTIN", "Backend", "available", "detect", "get_backend"]
