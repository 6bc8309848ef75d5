"""Keras 3 backend, on TensorFlow, JAX or PyTorch: wrappers on the ``call`` of every selected
layer. Registered as ``tensorflow`` (also reachable as ``keras``); a trace records its
framework as ``keras/<backend>`` (``keras/tensorflow``, ``keras/jax``, ``keras/torch``).

Keras 3 has no forward hooks. While attached, each selected layer gets an instance attribute
``call`` that runs the layer's own ``call`` and hands its outputs (and inputs, on request) to
the recorder; attention layers (``MultiHeadAttention`` and keras-hub's own) also get a
``_compute_attention`` wrapper that yields their softmax probabilities. Every wrapper is removed
on exit, whatever happened.

Eager calls (``model(x)``, on every backend) record tensors as they appear. On TensorFlow, in
a graph (``tf.function``, ``model.predict``) tensors are symbolic: the wrappers only collect
them while the graph is traced, and the model's top-level call appends one ``tf.py_function``
that receives their values when the graph runs and records the whole pass (``_keras_graph``).
``model.predict`` / ``evaluate`` / ``fit`` functions traced before the block are set aside for
the block (so they are traced again with the wrappers, without XLA, which cannot run Python)
and put back afterwards; on JAX that makes them run eagerly, so their values can be recorded.
A layer run under ``jax.jit`` by the user's own code yields tracers, not values: it is skipped
with a warning.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np

from layerscope.core import Recorder, Selection, SiteInfo
from layerscope.core.naming import hidden_size_of
from layerscope.core.recorder import SCALAR
from layerscope.core.reduce import PassMasks, Piece
from layerscope.core.userwarn import warn_user

from . import _keras_runtime as runtime
from ._keras_attention import (
    HubAttentionTap,
    attention_kind,
    is_attention_layer,
    is_multi_head_attention,
    scores_layers,
    tapped_compute_attention,
)
from ._keras_reduce import OPS
from ._keras_text import KerasHubTokenizer, adapt_tokenizer, load_hf_folder
from ._keras_tree import (
    OUTSIDE,
    named_layers,
    place_in_attention,
    roles_for,
    site_of,
)
from ._structure import leaves, part_kind
from .base import Backend

_TOKEN_KEYS = ("token_ids", "input_ids")
_MASK_KEYS = ("padding_mask", "attention_mask")  # which token positions are real
# Functions Keras traces once and caches; set aside while attached so they retrace.
_STEP_FUNCTIONS = ("predict_function", "test_function", "train_function")

to_numpy = runtime.to_numpy


def _tensors(value: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, tensor) for every tensor in a possibly nested structure, in its own order;
    JAX tracers included, so that they can be reported."""
    return leaves(value, lambda v: runtime.is_value(v) or runtime.is_tracer(v))


try:  # Keras computes output shapes by tracing ``call`` into a scratch graph it throws away
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope
except ImportError:  # pragma: no cover - a Keras without it traces nothing we would record
    def in_symbolic_scope() -> bool:
        return False


def _symbolic(args: Any) -> bool:
    """A call that computes no values: Keras building a functional graph from KerasTensors,
    or tracing ``call`` into a scratch graph to infer output shapes."""
    return in_symbolic_scope() or any(isinstance(v, keras.KerasTensor)
                                      for v in keras.tree.flatten(args))


def _batch_probe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The first batched input tensor of a top-level call, and its token ids if it has any."""
    ids = None
    first = None
    for path, tensor in _tensors((args, kwargs)):
        rank = runtime.rank(tensor)
        if ids is None and path and path[-1] in _TOKEN_KEYS and rank == 2:
            ids = tensor
        if first is None and rank is not None and rank >= 1:
            first = tensor
    if (ids is None and first is not None and runtime.rank(first) == 2
            and runtime.is_integer(first)):
        ids = first
    return (ids if ids is not None else first), ids


def _mask_probe(args: tuple[Any, ...], kwargs: dict[str, Any], ids: Any) -> Any:
    """The padding mask of a top-level call on token ids (keras-hub's ``padding_mask``)."""
    if ids is None:
        return None
    return next((tensor for path, tensor in _tensors((args, kwargs))
                 if path and path[-1] in _MASK_KEYS and runtime.rank(tensor) == 2), None)


class _Patch:
    """One instance attribute replaced for the duration of a block, put back exactly."""

    def __init__(self, obj: Any, attr: str, value: Any) -> None:
        self.obj, self.attr = obj, attr
        own = vars(obj)
        self.had = attr in own
        self.old = own.get(attr)
        object.__setattr__(obj, attr, value)  # bypass Keras' attribute tracking

    def undo(self) -> None:
        if self.had:
            object.__setattr__(self.obj, self.attr, self.old)
        else:
            object.__delattr__(self.obj, self.attr)


class _Capture:
    """The wrappers of one ``attach`` block and the state they share."""

    def __init__(self, model: Any, selection: Selection, recorder: Recorder) -> None:
        self.model = model
        self.selection = selection
        self.recorder: Recorder | None = recorder
        self.hidden_size = hidden_size_of(model)
        self.active = False
        self.patches: list[_Patch] = []
        self.saved: dict[str, Any] = {}
        self.graphs: list[Any] = []  # _keras_graph.GraphPass of the calls being traced
        self.depth = 0
        self.lock = threading.Lock()
        # id -> the scores tensor itself: holding it keeps the id from being reused by
        # another tensor before the pass ends
        self.attention_ids: dict[int, Any] = {}
        # id(attention layer) -> "self" / "cross" for the call in progress
        self.attention_kinds: dict[int, str | None] = {}
        self._warned: set[str] = set()
        self.masks = PassMasks(None)  # the pass's padding mask, for reductions

    # -- taking tensors ----------------------------------------------------------------------

    def take(self, site: str, kind: str, layer: Any, tensor: Any, place: str,
             attrs: Mapping[str, Any] | None = None) -> None:
        if not self.active or in_symbolic_scope():
            return
        if runtime.is_tracer(tensor):
            self._warn(site, f"{site}@{kind} runs under jax.jit, where it has no values; call "
                             "the model eagerly (model(x)) to capture it")
            return
        if not runtime.is_value(tensor):
            return
        eager = runtime.eager()
        if (eager and not self.depth) or (not eager and not self.graphs):
            return
        if runtime.rank(tensor) == 0:
            if self.recorder is not None:
                self.recorder.skip(site, kind, SCALAR)
            return
        for piece in self.reduce(site, kind, layer, tensor, place):
            merged = {**(attrs or {}), **piece.attrs} or None
            if eager:
                self.put(site, piece.kind, layer, piece.value, place, merged, piece.roles)
            elif not self.graphs[-1].collect((site, piece.kind, layer, place, merged,
                                              piece.roles), piece.value):
                self._warn(site, f"{site}@{kind} runs inside a tf.while_loop / tf.cond body of "
                                 "the graph and cannot be captured there; call the model "
                                 "eagerly")

    def reduce(self, site: str, kind: str, layer: Any, tensor: Any, place: str) -> list[Piece]:
        """``tensor``, or the reductions of it the selection asks for, computed here in
        ``keras.ops`` (in a graph: as part of it); roles () are left to :meth:`put`."""
        assert self.recorder is not None
        if not self.selection.reduces:
            return [Piece(kind, tensor, ())]
        shape = tuple(runtime.static_size(n) for n in tensor.shape)
        roles = roles_for(layer, kind, shape, self.hidden_size, place)  # type: ignore[arg-type]
        return self.recorder.reduce(site, kind, tensor, roles, OPS, self.masks)

    def put(self, site: str, kind: str, layer: Any, tensor: Any, place: str,
            attrs: Mapping[str, Any] | None = None, roles: tuple[str, ...] = ()) -> None:
        assert self.recorder is not None
        snapshot = None
        if isinstance(tensor, np.ndarray):
            held: Any = tensor
        elif runtime.keras_backend() == "torch":
            held, snapshot = tensor, runtime.snapshot_torch
        else:
            held = runtime.Held(tensor)
        if not roles:
            shape = tuple(int(n) for n in tensor.shape)
            roles = roles_for(layer, kind, shape, self.hidden_size, place)
        self.recorder.put(site, kind, held, roles, type(layer).__name__, to_numpy, snapshot,
                          attrs=attrs)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_user(f"layerscope: {message}")

    def take_inputs(self, site: str, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    place: str) -> None:
        for path, tensor in _tensors((args, kwargs)):  # path: (0, position) or (1, keyword)
            self.take(site, part_kind("input", path[1:]), layer, tensor, place)

    def take_outputs(self, site: str, layer: Any, output: Any, place: str) -> None:
        for path, tensor in _tensors(output):
            if id(tensor) in self.attention_ids:
                continue  # scores the layer was asked to return: stored as @attention
            self.take(site, part_kind("output", path), layer, tensor, place)

    # -- wrappers ----------------------------------------------------------------------------

    def wrap_layer(self, site: str, layer: Any, place: str,
                   attention: bool) -> Callable[..., Any]:
        original = layer.call
        inputs = self.selection.wants("input", site)
        outputs = self.selection.wants("output", site)

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            if inputs:
                self.take_inputs(site, layer, args, kwargs, place)
            if attention:  # the tap of _compute_attention labels the map with it
                self.attention_kinds[id(layer)] = attention_kind(layer, original, args, kwargs)
            result = original(*args, **kwargs)
            if outputs:
                self.take_outputs(site, layer, result, place)
            return result

        return call

    def wrap_root(self, site: str, layer: Any, selected: bool) -> Callable[..., Any]:
        original = layer.call
        inputs = selected and self.selection.wants("input", site)
        outputs = selected and self.selection.wants("output", site)

        def body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if inputs:
                self.take_inputs(site, layer, args, kwargs, OUTSIDE)
            result = original(*args, **kwargs)
            if outputs:
                self.take_outputs(site, layer, result, OUTSIDE)
            return result

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.active or self.depth or _symbolic((args, kwargs)):
                return original(*args, **kwargs)
            probe, ids = _batch_probe(args, kwargs)
            if probe is None or runtime.is_tracer(probe):
                return original(*args, **kwargs)
            mask = _mask_probe(args, kwargs, ids)
            self.masks = PassMasks(runtime.static_size(probe.shape[0]), mask)
            if runtime.eager():
                return self.eager_pass(body, args, kwargs, probe, ids, mask)
            return self.graph_pass(body, args, kwargs, probe, ids, mask)

        return call

    def attention_taker(self, site: str, layer: Any) -> Callable[[Any], None]:
        def take(scores: Any) -> None:
            if self.active and runtime.is_value(scores):
                self.attention_ids[id(scores)] = scores
                kind = self.attention_kinds.get(id(layer))
                self.take(site, "attention", layer, scores, OUTSIDE,
                          {"attention": kind} if kind else None)

        return take

    def tap_attention(self, site: str, layer: Any) -> None:
        take = self.attention_taker(site, layer)
        if is_multi_head_attention(layer):
            wrapper = tapped_compute_attention(layer, layer._compute_attention, take)
            self.patches.append(_Patch(layer, "_compute_attention", wrapper))
            return
        tap = HubAttentionTap(layer, take, lambda message: self._warn(site, f"{site}: {message}"))
        self.patches.append(_Patch(layer, "_masked_softmax", tap.masked_softmax))
        self.patches.append(_Patch(layer, "_compute_attention", tap.compute_attention))

    # -- passes ------------------------------------------------------------------------------

    def eager_pass(self, body: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   probe: Any, ids: Any, mask: Any = None) -> Any:
        recorder = self.recorder
        assert recorder is not None
        if recorder.in_pass:
            recorder.abort_pass()  # a previous pass raised before it returned
        self.attention_ids.clear()
        masked = {"attention_mask": to_numpy(mask)} if mask is not None else {}
        recorder.begin_pass(int(probe.shape[0]), to_numpy(ids) if ids is not None else None,
                            **masked)
        self.depth += 1
        try:
            result = body(args, kwargs)
        except BaseException:
            recorder.abort_pass()
            raise
        finally:
            self.depth -= 1
            self.attention_ids.clear()
        recorder.end_pass()
        return result

    def graph_pass(self, body: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   probe: Any, ids: Any, mask: Any = None) -> Any:
        from ._keras_graph import GraphPass  # TensorFlow only

        current = GraphPass()
        self.graphs.append(current)
        self.attention_ids.clear()
        try:
            result = body(args, kwargs)
        finally:
            self.graphs.pop()
            self.attention_ids.clear()
        current.record_when_run(probe, ids, self.replay, mask)
        return result

    def replay(self, metas: tuple[Any, ...], has_ids: bool, has_mask: bool, batch: Any,
               *values: Any) -> list[Any]:
        """Runs inside the graph: records one pass from the values it was handed."""
        recorder = self.recorder
        if not self.active or recorder is None:
            return []  # a graph traced while attached, run after the block ended
        ids = mask = None
        if has_ids:
            ids, values = values[0].numpy(), values[1:]
        if has_mask:
            mask, values = values[0].numpy(), values[1:]
        with self.lock:
            if recorder.in_pass:
                recorder.abort_pass()
            recorder.begin_pass(int(batch.numpy()), ids,
                                **({"attention_mask": mask} if mask is not None else {}))
            try:
                for (site, kind, layer, place, attrs, roles), value in zip(metas, values,
                                                                           strict=True):
                    self.put(site, kind, layer, value, place, attrs, roles)
            except BaseException:
                recorder.abort_pass()
                raise
            recorder.end_pass()
        return []

    # -- install / remove --------------------------------------------------------------------

    def install(self) -> None:
        model, selection = self.model, self.selection
        places: dict[int, str] = {}  # id(layer inside an attention layer) -> its place there
        for path, layer in named_layers(model):
            attention = is_attention_layer(layer)
            if attention:
                scores = scores_layers(layer)
                places.update((id(s), place_in_attention(s, scores))
                              for _, s in named_layers(layer) if s is not layer)
            site = site_of(path)
            if not selection.matches(site):
                continue
            tapped = attention and selection.wants("attention", site)
            if layer is not model and (tapped or selection.wants("output", site)
                                       or selection.wants("input", site)):
                wrapper = self.wrap_layer(site, layer, places.get(id(layer), OUTSIDE), tapped)
                self.patches.append(_Patch(layer, "call", wrapper))
            if tapped:
                self.tap_attention(site, layer)
        root = site_of("")
        selected = selection.matches(root)
        self.patches.append(_Patch(model, "call", self.wrap_root(root, model, selected)))
        self._set_aside_step_functions()
        self.active = True

    def _set_aside_step_functions(self) -> None:
        for name in _STEP_FUNCTIONS:
            if hasattr(self.model, name):
                self.saved[name] = getattr(self.model, name)
                setattr(self.model, name, None)
        if getattr(self.model, "_jit_compile", None):
            self.saved["_jit_compile"] = self.model._jit_compile
            self.model._jit_compile = False  # XLA / jax.jit cannot hand values to Python

    def remove(self) -> None:
        self.active = False
        try:
            for patch in reversed(self.patches):
                patch.undo()
            self.patches.clear()
            for name, value in self.saved.items():
                setattr(self.model, name, value)
            self.saved.clear()
        finally:
            recorder, self.recorder = self.recorder, None
            if recorder is not None and recorder.in_pass:
                recorder.abort_pass()


class KerasBackend:
    """The Keras 3 backend; ``name`` says which backend Keras runs on in this process."""

    name = runtime.framework_name()
    extra = "tensorflow"

    def can_handle(self, model: Any) -> bool:
        layers = sys.modules.get("keras.layers")
        layer_class = getattr(layers, "Layer", None)
        return layer_class is not None and isinstance(model, layer_class)

    def sites(self, model: Any) -> list[SiteInfo]:
        return [SiteInfo(site_of(path), type(layer).__name__, is_attention_layer(layer))
                for path, layer in named_layers(model)]

    @contextmanager
    def attach(self, model: Any, selection: Selection, recorder: Recorder) -> Iterator[None]:
        capture = _Capture(model, selection, recorder)
        try:
            capture.install()
            yield
        finally:
            capture.remove()

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return to_numpy(tensor)

    def framework_version(self) -> str:
        return runtime.framework_version()

    def describe(self, model: Any) -> dict[str, Any]:
        cls = type(model)
        described: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        name = getattr(model, "name", None)
        if name:
            described["name"] = str(name)
        return described

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args = tuple(runtime.convert_input(a) for a in args)
        kwargs = {k: runtime.convert_input(v) for k, v in kwargs.items()}
        names = _dict_input_names(model)
        with runtime.no_grad():
            if not args and kwargs and names is not None:
                # a functional model with named inputs (keras-hub backbones) takes one dict
                return model({k: v for k, v in kwargs.items() if k in names}, training=False)
            return model(*args, **kwargs)

    def adapt_tokenizer(self, tokenizer: Any, model: Any = None) -> Any:
        """A keras-hub tokenizer/preprocessor turned into what ``capture`` calls; others kept."""
        return adapt_tokenizer(tokenizer, model)

    def load_folder(self, folder: Path, attn_implementation: str | None = None
                    ) -> tuple[Any, Any]:
        """A Hugging Face folder loaded into its keras-hub backbone (``load_hf_folder``);
        keras-hub has one attention implementation, so ``attn_implementation`` is ignored."""
        return load_hf_folder(folder)


#: the name the class had when it served TensorFlow only
TensorFlowBackend = KerasBackend


def _dict_input_names(model: Any) -> set[str] | None:
    structure = getattr(model, "_inputs_struct", None)
    if isinstance(structure, Mapping):
        return {str(k) for k in structure}
    return None


BACKEND: Backend = KerasBackend()

__all__ = ["BACKEND", "KerasBackend", "KerasHubTokenizer", "TensorFlowBackend",
           "adapt_tokenizer", "load_hf_folder", "to_numpy"]
