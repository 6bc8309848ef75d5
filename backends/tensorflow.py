"""TensorFlow / Keras 3 backend: wrappers on the ``call`` of every selected layer.

Keras 3 has no forward hooks. While attached, each selected layer gets an instance attribute
``call`` that runs the layer's own ``call`` and hands its outputs (and inputs, on request) to
the recorder; ``MultiHeadAttention`` layers also get a ``_compute_attention`` wrapper that
yields their softmax probabilities. Every wrapper is removed on exit, whatever happened.

Eager calls (``model(x)``) record tensors as they appear. In a graph (``tf.function``,
``model.predict``) tensors are symbolic: the wrappers only collect them while the graph is
traced, and the model's top-level call appends one ``tf.py_function`` that receives their
values when the graph runs and records the whole pass. ``model.predict`` / ``evaluate`` /
``fit`` functions traced before the block are set aside for the block (so they are traced again
with the wrappers, without XLA, which cannot run Python) and put back afterwards.
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
import tensorflow as tf

from layerscope.core import BackendError, Recorder, Selection, SiteInfo
from layerscope.core.naming import hidden_size_of
from layerscope.core.userwarn import warn_user

from ._keras_attention import tapped_compute_attention
from ._keras_text import KerasHubTokenizer, adapt_tokenizer, load_hf_folder
from ._keras_tree import (
    is_attention_layer,
    named_layers,
    roles_for,
    site_of,
)
from ._structure import leaves, part_kind
from .base import Backend

_UNSTORABLE = (tf.string, tf.variant, tf.resource)
_TOKEN_KEYS = ("token_ids", "input_ids")
# Functions Keras traces once and caches; set aside while attached so they retrace.
_STEP_FUNCTIONS = ("predict_function", "test_function", "train_function")


class _Held:
    """An eager tensor queued for the writer, with the byte size its memory budget counts."""

    __slots__ = ("nbytes", "shape", "tensor")

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor
        self.shape = tuple(int(n) for n in tensor.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * tensor.dtype.size


def to_numpy(value: Any) -> np.ndarray:
    """A host copy of an eager tensor, dtype kept (bfloat16 widened to float32, exactly)."""
    if isinstance(value, _Held):
        value = value.tensor
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


def _is_tensor(value: Any) -> bool:
    """A dense TF tensor or NumPy array with storable values (functional models receive
    NumPy inputs as they are); no KerasTensor, ragged, sparse or string tensors."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf" or value.dtype.name == "bfloat16"
    if not isinstance(value, (tf.Tensor, tf.Variable)) or isinstance(value, keras.KerasTensor):
        return False
    return value.dtype not in _UNSTORABLE


def _is_integer(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iu"
    return bool(value.dtype.is_integer)


def _rank(value: Any) -> int | None:
    return value.ndim if isinstance(value, np.ndarray) else value.shape.rank


def _tensors(value: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, tensor) for every tensor in a possibly nested structure, in its own order."""
    return leaves(value, _is_tensor)


try:  # Keras computes output shapes by tracing ``call`` into a scratch graph it throws away
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope
except ImportError:  # pragma: no cover - a Keras without it traces nothing we would record
    def in_symbolic_scope() -> bool:
        return False


def _symbolic(args: Any) -> bool:
    """A call that computes no values: Keras building a functional graph from KerasTensors,
    or tracing ``call`` into a scratch graph to infer output shapes."""
    return in_symbolic_scope() or any(isinstance(v, keras.KerasTensor)
                                      for v in tf.nest.flatten(args))


def _batch_probe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The first batched input tensor of a top-level call, and its token ids if it has any."""
    ids = None
    first = None
    for path, tensor in _tensors((args, kwargs)):
        rank = _rank(tensor)
        if ids is None and path and path[-1] in _TOKEN_KEYS and rank == 2:
            ids = tensor
        if first is None and rank is not None and rank >= 1:
            first = tensor
    if ids is None and first is not None and _rank(first) == 2 and _is_integer(first):
        ids = first
    return (ids if ids is not None else first), ids


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


class _GraphPass:
    """Tensors collected while one top-level call is traced into a graph."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.metas: list[tuple[str, str, Any, bool]] = []
        self.tensors: list[Any] = []


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
        self.graphs: list[_GraphPass] = []
        self.depth = 0
        self.lock = threading.Lock()
        # id -> the scores tensor itself: holding it keeps the id from being reused by
        # another tensor before the pass ends
        self.attention_ids: dict[int, Any] = {}
        self._warned: set[str] = set()

    # -- taking tensors ----------------------------------------------------------------------

    def take(self, site: str, kind: str, layer: Any, tensor: Any, in_attention: bool) -> None:
        if not self.active or not _is_tensor(tensor) or _rank(tensor) == 0 or in_symbolic_scope():
            return
        if tf.executing_eagerly():
            if self.depth:
                self.put(site, kind, layer, tensor, in_attention)
            return
        current = self.graphs[-1] if self.graphs else None
        if current is None:
            return
        if isinstance(tensor, np.ndarray):
            tensor = tf.constant(tensor)
        if tensor.graph is not current.graph:
            # made inside a loop or branch body: its value never leaves that body
            self._warn(site, f"{site}@{kind} runs inside a tf.while_loop / tf.cond body of the "
                             "graph and cannot be captured there; call the model eagerly")
            return
        current.metas.append((site, kind, layer, in_attention))
        current.tensors.append(tensor)

    def put(self, site: str, kind: str, layer: Any, tensor: Any, in_attention: bool) -> None:
        assert self.recorder is not None
        held = tensor if isinstance(tensor, np.ndarray) else _Held(tensor)
        roles = roles_for(layer, kind, held.shape, self.hidden_size, in_attention)
        self.recorder.put(site, kind, held, roles, type(layer).__name__, to_numpy)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_user(f"layerscope: {message}")

    def take_inputs(self, site: str, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    in_attention: bool) -> None:
        for path, tensor in _tensors((args, kwargs)):  # path: (0, position) or (1, keyword)
            self.take(site, part_kind("input", path[1:]), layer, tensor, in_attention)

    def take_outputs(self, site: str, layer: Any, output: Any, in_attention: bool) -> None:
        for path, tensor in _tensors(output):
            if id(tensor) in self.attention_ids:
                continue  # scores the layer was asked to return: stored as @attention
            self.take(site, part_kind("output", path), layer, tensor, in_attention)

    # -- wrappers ----------------------------------------------------------------------------

    def wrap_layer(self, site: str, layer: Any, in_attention: bool) -> Callable[..., Any]:
        original = layer.call
        inputs = self.selection.wants("input", site)
        outputs = self.selection.wants("output", site)

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            if inputs:
                self.take_inputs(site, layer, args, kwargs, in_attention)
            result = original(*args, **kwargs)
            if outputs:
                self.take_outputs(site, layer, result, in_attention)
            return result

        return call

    def wrap_root(self, site: str, layer: Any, selected: bool) -> Callable[..., Any]:
        original = layer.call
        inputs = selected and self.selection.wants("input", site)
        outputs = selected and self.selection.wants("output", site)

        def body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if inputs:
                self.take_inputs(site, layer, args, kwargs, False)
            result = original(*args, **kwargs)
            if outputs:
                self.take_outputs(site, layer, result, False)
            return result

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.active or self.depth or _symbolic((args, kwargs)):
                return original(*args, **kwargs)
            probe, ids = _batch_probe(args, kwargs)
            if probe is None:
                return original(*args, **kwargs)
            if tf.executing_eagerly():
                return self.eager_pass(body, args, kwargs, probe, ids)
            return self.graph_pass(body, args, kwargs, probe, ids)

        return call

    def wrap_attention(self, site: str, layer: Any) -> Callable[..., Any]:
        def take(scores: Any) -> None:
            if self.active and _is_tensor(scores):
                self.attention_ids[id(scores)] = scores
                self.take(site, "attention", layer, scores, True)

        return tapped_compute_attention(layer, layer._compute_attention, take)

    # -- passes ------------------------------------------------------------------------------

    def eager_pass(self, body: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   probe: Any, ids: Any) -> Any:
        recorder = self.recorder
        assert recorder is not None
        if recorder.in_pass:
            recorder.abort_pass()  # a previous pass raised before it returned
        self.attention_ids.clear()
        recorder.begin_pass(int(probe.shape[0]), to_numpy(ids) if ids is not None else None)
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
                   probe: Any, ids: Any) -> Any:
        current = _GraphPass(tf.compat.v1.get_default_graph())
        self.graphs.append(current)
        self.attention_ids.clear()
        try:
            result = body(args, kwargs)
        finally:
            self.graphs.pop()
            self.attention_ids.clear()
        # One op records the pass when the graph runs; tf.function runs every stateful op,
        # in program order, so passes arrive in the order the model was called.
        head = [tf.shape(probe)[0]] + ([tf.convert_to_tensor(ids)] if ids is not None else [])
        replay = functools.partial(self.replay, tuple(current.metas), ids is not None)
        tf.py_function(replay, head + current.tensors, Tout=[], name="layerscope_record")
        return result

    def replay(self, metas: tuple[tuple[str, str, Any, bool], ...], has_ids: bool,
               batch: Any, *values: Any) -> list[Any]:
        """Runs inside the graph: records one pass from the values it was handed."""
        recorder = self.recorder
        if not self.active or recorder is None:
            return []  # a graph traced while attached, run after the block ended
        if has_ids:
            ids, values = values[0].numpy(), values[1:]
        else:
            ids = None
        with self.lock:
            if recorder.in_pass:
                recorder.abort_pass()
            recorder.begin_pass(int(batch.numpy()), ids)
            try:
                for (site, kind, layer, in_attention), value in zip(metas, values, strict=True):
                    self.put(site, kind, layer, value, in_attention)
            except BaseException:
                recorder.abort_pass()
                raise
            recorder.end_pass()
        return []

    # -- install / remove --------------------------------------------------------------------

    def install(self) -> None:
        model, selection = self.model, self.selection
        under_attention: set[int] = set()
        for path, layer in named_layers(model):
            if is_attention_layer(layer):
                under_attention.update(id(s) for _, s in named_layers(layer) if s is not layer)
            if layer is model:
                continue
            site = site_of(path)
            if not selection.matches(site):
                continue
            in_attention = id(layer) in under_attention
            if selection.wants("output", site) or selection.wants("input", site):
                wrapper = self.wrap_layer(site, layer, in_attention)
                self.patches.append(_Patch(layer, "call", wrapper))
            if selection.wants("attention", site) and is_attention_layer(layer):
                self.patches.append(_Patch(layer, "_compute_attention",
                                           self.wrap_attention(site, layer)))
        root = site_of("")
        selected = selection.matches(root)
        self.patches.append(_Patch(model, "call", self.wrap_root(root, model, selected)))
        if selected and selection.wants("attention", root) and is_attention_layer(model):
            self.patches.append(_Patch(model, "_compute_attention",
                                       self.wrap_attention(root, model)))
        self._set_aside_step_functions()
        self.active = True

    def _set_aside_step_functions(self) -> None:
        for name in _STEP_FUNCTIONS:
            if hasattr(self.model, name):
                self.saved[name] = getattr(self.model, name)
                setattr(self.model, name, None)
        if getattr(self.model, "_jit_compile", None):
            self.saved["_jit_compile"] = self.model._jit_compile
            self.model._jit_compile = False  # XLA cannot run the recording py_function

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


class TensorFlowBackend:
    name = "tensorflow"
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
        if keras.backend.backend() != "tensorflow":
            raise BackendError(
                f"Keras runs on its {keras.backend.backend()!r} backend; layerscope captures Keras "
                "models on the TensorFlow backend: set KERAS_BACKEND=tensorflow before importing "
                "keras"
            )
        capture = _Capture(model, selection, recorder)
        try:
            capture.install()
            yield
        finally:
            capture.remove()

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return to_numpy(tensor)

    def framework_version(self) -> str:
        return f"{tf.__version__} (keras {keras.__version__})"

    def describe(self, model: Any) -> dict[str, Any]:
        cls = type(model)
        described: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        name = getattr(model, "name", None)
        if name:
            described["name"] = str(name)
        return described

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def convert(value: Any) -> Any:
            return tf.convert_to_tensor(value) if isinstance(value, np.ndarray) else value

        args = tuple(convert(a) for a in args)
        kwargs = {k: convert(v) for k, v in kwargs.items()}
        names = _dict_input_names(model)
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


def _dict_input_names(model: Any) -> set[str] | None:
    structure = getattr(model, "_inputs_struct", None)
    if isinstance(structure, Mapping):
        return {str(k) for k in structure}
    return None


BACKEND: Backend = TensorFlowBackend()

__all__ = ["BACKEND", "KerasHubTokenizer", "TensorFlowBackend", "adapt_tokenizer",
           "load_hf_folder", "to_numpy"]
