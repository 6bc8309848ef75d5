"""JAX backend: Flax NNX modules, Flax Linen modules and plain JAX functions, eager or jitted.

- NNX: while attached, the ``__call__`` of every module class in the model is wrapped; a call
  on a module of the model (found by identity, or by graph path in the copy ``nnx.jit``
  hands to the traced function) is captured under its path (``layers.3.attention``).
- Linen: a ``flax.linen.intercept_methods`` interceptor sees every module call made by
  ``model.apply(variables, ...)`` (or a bound module's call) with its scope path
  (``encoder.layers_3``).
- Plain functions: traced to a jaxpr and captured by ``jax.named_scope`` names (see
  ``_jax_scopes``); the user calls them through the trace: ``t(params, x)``.

Inside ``jax.jit`` / ``nnx.jit`` the captured values leave the compiled computation as extra
outputs (plain functions, and NNX models called directly under ``nnx.jit``: ``_jax_outbox``)
or through one host callback per pass (everything else); the function stays compiled.
Attention probabilities come from the softmax of attention modules and of scopes named
``...attention``, as (batch, head, query, key).
"""

from __future__ import annotations

import functools
import json
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerscope.core import BackendError, Recorder, Selection, SiteInfo
from layerscope.core.naming import ROOT_SITE, hidden_size_of
from layerscope.core.userwarn import warn_user

from . import _jax_outbox
from ._jax_attention import AttentionTaps, is_attention_name
from ._jax_dims import to_numpy
from ._jax_modules import ModuleEngine
from ._jax_runtime import Sink, activated, capture_key
from ._jax_scopes import FunctionCapture
from ._jax_seq2seq import is_encoder_decoder
from ._patches import wrapped
from .base import Backend, class_mro_modules

_OTHER_FRAMEWORKS = {"torch", "tensorflow", "keras", "tf_keras", "keras_hub"}
#: plain functions being traced -> the capture that runs them (``Trace.__call__`` / ``run``)
_functions: dict[int, FunctionCapture] = {}


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


def _linen() -> Any:
    return sys.modules.get("flax.linen")


def model_kind(model: Any) -> str | None:
    """``nnx``, ``linen``, ``function`` or None, without importing anything."""
    nnx, linen = _nnx(), _linen()
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    if linen is not None and isinstance(model, linen.Module):
        return "linen"
    return "function" if _is_function(model) else None


def _is_function(model: Any) -> bool:
    if isinstance(model, type) or not callable(model):
        return False
    if isinstance(model, functools.partial):
        return _is_function(model.func)
    owner = model.__self__ if isinstance(model, types.MethodType) else model
    roots = set(class_mro_modules(owner))
    if roots & _OTHER_FRAMEWORKS:
        return False
    if roots & {"jax", "jaxlib"}:
        return True  # jax.jit / jax.vmap / ... wrappers
    return isinstance(model, (types.FunctionType, types.MethodType))


def _site(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path) or ROOT_SITE


# -- NNX ---------------------------------------------------------------------------------------


def nnx_modules(model: Any) -> list[tuple[str, Any]]:
    """(site, module) for every module in an NNX graph, parents before children."""
    nnx = _nnx()
    found = [(tuple(path), node) for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module)]
    first: dict[tuple[Any, ...], int] = {}
    for index, (path, _) in enumerate(found):
        for n in range(len(path) + 1):
            first.setdefault(path[:n], index)
    found.sort(key=lambda item: tuple(first[item[0][:n]] for n in range(1, len(item[0]) + 1)))
    return [(_site(path), node) for path, node in found]


def _call_owner(cls: type) -> type | None:
    """The class in ``cls``'s MRO that defines the ``__call__`` its instances run."""
    return next((k for k in cls.__mro__ if "__call__" in k.__dict__ and k is not object), None)


#: The NNX models traced now, by any trace: another instance of a model's class is taken for a
#: copy ``nnx.jit`` made of it only when it is none of these
_TRACED_MODELS: list[Any] = []


class _NnxWrappers:
    """Temporarily wraps ``__call__`` on the classes the model's modules use."""

    def __init__(self, model: Any, engine: ModuleEngine) -> None:
        self.model = model
        self.engine = engine
        modules = nnx_modules(model)
        self.sites = {id(module): site for site, module in modules if site != ROOT_SITE}
        self._keep = [module for _, module in modules]  # ids stay valid while attached
        owners = (_call_owner(type(module)) for module in self._keep)
        self.classes = list(dict.fromkeys(k for k in owners if k is not None))

    def check_root(self) -> None:
        owner = _call_owner(type(self.model))
        call = owner.__dict__["__call__"] if owner is not None else None
        if call is not None and not isinstance(call, types.FunctionType):
            warn_user(
                f"layerscope: {type(self.model).__qualname__}.__call__ is wrapped "
                f"({type(call).__qualname__}, e.g. by @nnx.jit): its submodules run inside that "
                "transform, where they cannot be captured, so only the model's output is. "
                "Remove the decorator and call a compiled function of the model instead: "
                "nnx.jit(lambda m, x: m(x))(model, x)")

    @contextmanager
    def installed(self) -> Iterator[None]:
        self.check_root()
        with ExitStack() as stack:
            for cls in self.classes:  # put back in any order traces on other threads end
                stack.enter_context(wrapped(cls, "__call__", self._wrap))
            _TRACED_MODELS.append(self.model)
            stack.callback(self._forget)
            yield

    def _forget(self) -> None:
        """Take the model off ``_TRACED_MODELS``, found by identity (a model class may define
        ``==``)."""
        index = next(i for i, traced in enumerate(_TRACED_MODELS) if traced is self.model)
        del _TRACED_MODELS[index]

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def __call__(module: Any, *args: Any, **kwargs: Any) -> Any:
            return self.call(module, original, args, kwargs)

        return __call__

    def call(self, module: Any, original: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        bound = functools.partial(original, module)
        engine = self.engine
        if engine.current is not None:
            return engine.child(module, bound, args, kwargs)
        if module is self.model:
            return engine.root(module, lambda m: self.sites.get(id(m)), bound, args, kwargs)
        if type(module) is type(self.model) and \
                not any(module is traced for traced in _TRACED_MODELS):
            # the copy nnx.jit / nnx.merge made of the model (not another traced instance)
            sites = {id(m): s for s, m in nnx_modules(module) if s != ROOT_SITE}
            return engine.root(module, lambda m: sites.get(id(m)), bound, args, kwargs)
        return bound(*args, **kwargs)


# -- Linen -------------------------------------------------------------------------------------


def _linen_site(module: Any) -> str | None:
    if getattr(module, "scope", None) is None or not module.path:
        return None
    return ".".join(str(part) for part in module.path)


class _LinenInterceptor:
    """A ``flax.linen.intercept_methods`` interceptor that reports calls to the engine."""

    def __init__(self, model: Any, engine: ModuleEngine) -> None:
        self.model_type = type(model)
        self.engine = engine

    def __call__(self, next_fun: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], context: Any) -> Any:
        module, method = context.module, context.method_name
        engine = self.engine
        if method == "setup" or getattr(module, "scope", None) is None:
            return next_fun(*args, **kwargs)
        if engine.current is None:
            if not module.path and type(module) is self.model_type and \
                    not module.is_initializing():
                return engine.root(module, _linen_site, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)
        if method != "__call__":
            return next_fun(*args, **kwargs)
        return engine.child(module, next_fun, args, kwargs)


def linen_modules(model: Any) -> list[tuple[str, Any]]:
    """(site, module) for the root and the submodules a Linen model defines in ``setup``.

    Submodules made inline in ``@compact`` methods exist only while the model runs; they are
    captured all the same, but cannot be listed before a call.
    """
    linen = _linen()
    found: list[tuple[str, Any]] = [(ROOT_SITE, model)]
    try:
        bound = model if model.scope is not None else model.bind({})
    except Exception:
        return found

    def children(value: Any) -> Iterator[Any]:
        if isinstance(value, linen.Module):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from children(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from children(item)

    def walk(module: Any) -> None:
        try:
            module._try_setup()  # runs setup(), which defines the submodules
        except Exception:
            return
        for name, value in list(vars(module).items()):
            if name.startswith("_") or name in ("parent", "scope"):
                continue
            for child in children(value):
                site = _linen_site(child)
                if site is not None and all(site != s for s, _ in found):
                    found.append((site, child))
                    walk(child)

    walk(bound)
    return found


# -- the backend -------------------------------------------------------------------------------


class JaxBackend:
    name = "jax"
    extra = "jax"

    def can_handle(self, model: Any) -> bool:
        return model_kind(model) is not None

    def sites(self, model: Any) -> list[SiteInfo]:
        kind = self._kind(model)
        if kind == "function":
            return [SiteInfo(ROOT_SITE, getattr(model, "__qualname__", type(model).__name__))]
        modules = nnx_modules(model) if kind == "nnx" else linen_modules(model)
        attention = {site for site, module in modules if is_attention_name(type(module).__name__)}
        infos = []
        for site, module in modules:
            if site != ROOT_SITE and not callable(module):
                continue  # containers (nnx.List, nnx.Dict) are never called
            inner = any(other.startswith(site + ".") for other in attention) and site != ROOT_SITE
            infos.append(SiteInfo(site, type(module).__name__, site in attention and not inner))
        return infos

    @contextmanager
    def attach(self, model: Any, selection: Selection, recorder: Recorder) -> Iterator[None]:
        kind = self._kind(model)
        described = json.dumps([type(model).__module__, type(model).__qualname__, id(model),
                                selection.to_json()], sort_keys=True)
        sink = Sink(recorder, capture_key(described))
        with activated(sink):
            if kind == "function":
                _functions[id(model)] = FunctionCapture(model, selection, sink)
                try:
                    yield
                finally:
                    _functions.pop(id(model), None)
            else:
                send = _jax_outbox.send if kind == "nnx" else None
                modules = nnx_modules(model) if kind == "nnx" else linen_modules(model)
                encoder_decoder = is_encoder_decoder(model, modules)
                recorder.encoder_decoder = encoder_decoder  # variables record their stack
                engine = ModuleEngine(selection, sink, hidden_size_of(model), send,
                                      encoder_decoder)
                with ExitStack() as stack:
                    if kind == "nnx":
                        stack.enter_context(_jax_outbox.installed(model))
                        stack.enter_context(_NnxWrappers(model, engine).installed())
                    else:
                        stack.enter_context(
                            _linen().intercept_methods(_LinenInterceptor(model, engine)))
                    if selection.wants("attention"):
                        taps = AttentionTaps(engine.probabilities, engine.taps_active)
                        stack.enter_context(taps.patched())
                    try:
                        yield
                    finally:
                        engine.current = None
                        sink.abort()
        sink.raise_errors()

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return to_numpy(tensor)

    def framework_version(self) -> str:
        flax = sys.modules.get("flax")
        version = getattr(flax, "__version__", None)
        return f"jax {jax.__version__}" + (f", flax {version}" if version else "")

    def describe(self, model: Any) -> dict[str, Any]:
        if self._kind(model) == "function":
            target = model.func if isinstance(model, functools.partial) else model
            name = getattr(target, "__qualname__", type(target).__qualname__)
            return {"class": f"{getattr(target, '__module__', '')}.{name}", "name": name}
        described: dict[str, Any] = {
            "class": f"{type(model).__module__}.{type(model).__qualname__}"}
        config = getattr(model, "config", None)
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if name:
            described["name"] = str(name).rstrip("/").rsplit("/", 1)[-1]
        return described

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def convert(value: Any) -> Any:
            return jnp.asarray(value) if isinstance(value, np.ndarray) else value

        args = tuple(convert(a) for a in args)
        kwargs = {k: convert(v) for k, v in kwargs.items()}
        kind = self._kind(model)
        if kind == "function":
            capture = _functions.get(id(model))
            return capture(*args, **kwargs) if capture is not None else model(*args, **kwargs)
        if kind == "linen" and getattr(model, "scope", None) is None:
            raise BackendError(
                f"the Linen module {type(model).__qualname__} has no variables: pass "
                "model.bind(variables) to capture(), or call model.apply(variables, x) inside "
                "'with layerscope.trace(model, ...)'"
            )
        return model(*args, **kwargs)

    def _kind(self, model: Any) -> str:
        kind = model_kind(model)
        if kind is None:
            raise BackendError(
                f"the jax backend cannot capture a {type(model).__qualname__}: pass a "
                "flax.nnx.Module, a flax.linen.Module or a JAX function"
            )
        return kind


BACKEND: Backend = JaxBackend()
