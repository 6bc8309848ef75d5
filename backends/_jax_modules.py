"""Capturing Flax module calls (NNX and Linen): passes, frames and what each frame takes.

A pass starts when the traced model's own method is called and ends when it returns; every
module call inside it with a known path is a frame. A frame takes its inputs and outputs as
the selection asks, and the attention probabilities formed inside it when it is the
innermost attention module (or when the softmax runs in a ``jax.named_scope`` whose name ends
with ``attention``).

Values are taken only from the trace the pass runs in: a module called inside a nested
transform (``nnx.scan`` in a recurrent layer, ``vmap``, a jit inside the model) returns
per-step or per-example values without the batch axis first, so it is left alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jax.extend import core as jex_core

from layerscope.core import Selection
from layerscope.core.naming import ROOT_SITE, move_batch_first
from layerscope.core.recorder import SCALAR
from layerscope.core.reduce import PassMasks

from . import _jax_seq2seq as seq2seq
from ._jax_attention import attention_kind, current_scopes, is_attention_name, is_attention_scope
from ._jax_dims import Context, arrays, batch_of, flax_classes, image_layout, is_array, roles_for
from ._jax_reduce import pass_masks, reduced
from ._jax_runtime import Item, Outbound, Sink, uncaptured
from ._structure import part_kind

#: module -> its site path, or None when the module is not part of the traced model
SiteOf = Callable[[Any], "str | None"]
#: (traced root module, where the values go, the values) -> whether they were sent as outputs
Send = Callable[[Any, Outbound, list[Any]], bool]


def trace_state() -> Any:
    """An opaque token for the JAX trace the caller runs in (equal tokens: same trace)."""
    return jex_core.get_opaque_trace_state(convention="flax")


@dataclass
class Frame:
    module: Any
    site: str
    attention: bool
    probs: Any = None
    #: (rank, channels) of the channels-last map last made inside this module's call
    image: tuple[int, int] | None = None


@dataclass
class Pass:
    traced: bool  # inside jax.jit & co: values are tracers, sent out by one callback
    state: Any
    batch: int
    token_ids: Any
    site_of: SiteOf
    frames: list[Frame] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    #: attention maps stored this pass, by id; held, so that no later array can reuse an id
    #: (an output mistaken for a map handed back would be dropped)
    seen: dict[int, Any] = field(default_factory=dict)
    #: roles given to arrays this pass, by id, with a weak reference to the array (an id
    #: freed and reused by a new array must not hand its roles on)
    layouts: dict[int, tuple[Callable[[], Any], tuple[str, ...]]] = field(default_factory=dict)
    #: the pass's real-token mask (its ``attention_mask`` argument), for reductions
    masks: PassMasks = field(default_factory=lambda: PassMasks(None))

    def roles_of(self, value: Any) -> tuple[str, ...] | None:
        entry = self.layouts.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def remember(self, value: Any, roles: tuple[str, ...]) -> None:
        try:
            ref: Callable[[], Any] = weakref.ref(value)
        except TypeError:
            ref = lambda: value  # noqa: E731  (an array type without weak references)
        self.layouts[id(value)] = (ref, roles)


class ModuleEngine:
    """Runs passes over module calls reported by the NNX or Linen wrappers."""

    def __init__(self, selection: Selection, sink: Sink, hidden_size: int | None,
                 send: Send | None = None, encoder_decoder: bool = False) -> None:
        self.selection = selection
        self.sink = sink
        self.send = send  # values out of a traced pass as outputs, when it can; else a callback
        self.hidden_size = hidden_size
        #: the model has an encoder and a decoder stack: token axes are named for their side
        self.encoder_decoder = encoder_decoder
        self.eager_state = trace_state()
        self.current: Pass | None = None

    # -- calls -------------------------------------------------------------------------------

    def root(self, module: Any, site_of: SiteOf, call: Callable[..., Any],
             args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The traced model's own call: one pass (one batch) of the trace."""
        if self.current is not None:
            return self.child(module, call, args, kwargs)
        batch, token_ids = batch_of(args, kwargs)
        if batch is None:
            return call(*args, **kwargs)  # no array in: nothing to label as a batch
        state = trace_state()
        current = Pass(state != self.eager_state, state, batch, token_ids, site_of)
        current.masks = pass_masks(batch, token_ids, kwargs)
        mask = current.masks.masks["token"]
        decoder_ids = self._decoder_ids(current, kwargs)
        self.current = current
        try:
            if current.traced:
                out = self._frame(current, module, ROOT_SITE, call, args, kwargs)
            else:
                self.sink.begin(batch, token_ids, decoder_ids, mask)
                with uncaptured():
                    out = self._frame(current, module, ROOT_SITE, call, args, kwargs)
        except BaseException:
            self.current = None
            if not current.traced:
                self.sink.abort()
            raise
        self.current = None
        if not current.traced:
            self.sink.end()
        elif current.items:
            outbound, operands = self.sink.outbound(batch, token_ids, current.items,
                                                    decoder_ids, mask)
            if self.send is None or not self.send(module, outbound, operands):
                self.sink.callback(outbound, operands)
        return out

    def _decoder_ids(self, current: Pass, kwargs: dict[str, Any]) -> Any:
        """An encoder-decoder model's decoder token ids, by keyword; the sides of both."""
        if not self.encoder_decoder:
            return None
        if current.token_ids is not None:
            current.remember(current.token_ids, ("batch", "token"))
        found = next((kwargs[k] for k in seq2seq.DECODER_ID_ARGUMENTS
                      if is_array(kwargs.get(k)) and kwargs[k].ndim == 2), None)
        if found is not None:
            current.remember(found, ("batch", "decoder_token"))
        return found

    def child(self, module: Any, call: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        current = self.current
        site = current.site_of(module) if current is not None else None
        if current is None or site is None or \
                (current.frames and current.frames[-1].module is module) or \
                trace_state() != current.state:
            return call(*args, **kwargs)
        return self._frame(current, module, site, call, args, kwargs)

    def probabilities(self, probs: Any) -> Any:
        """Attention probabilities formed by the code now running (from the softmax taps)."""
        current = self.current
        if current is None or not current.frames or trace_state() != current.state:
            return probs
        frame = next((f for f in reversed(current.frames) if f.attention), None)
        if frame is None and any(is_attention_scope(s) for s in current_scopes()[-1:]):
            frame = current.frames[-1]
        if frame is not None:
            frame.probs = probs
        return probs

    def taps_active(self) -> bool:
        return self.current is not None

    # -- frames ------------------------------------------------------------------------------

    def _frame(self, current: Pass, module: Any, site: str, call: Callable[..., Any],
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        recorder = self.sink.recorder
        selected = self.selection.matches(site)
        if recorder.selection.wants("input", site):
            for path, value in arrays((args, kwargs)):  # path: (0, position) or (1, keyword)
                if is_array(value) and value.ndim > 0:
                    kind = part_kind("input", path[1:])
                    roles = current.roles_of(value) or self._sided(
                        roles_for(module, kind, tuple(value.shape), self.hidden_size),
                        seq2seq.stack_of(site))
                    self._take(current, module, site, kind, value, roles)
        frame = Frame(module, site, is_attention_name(type(module).__name__))
        if self.encoder_decoder and frame.attention:
            self._mark_cross_inputs(current, module, site, args, kwargs)
        depth = len(current.frames)
        parent = current.frames[-1] if current.frames else None
        current.frames.append(frame)
        try:
            out = call(*args, **kwargs)
        finally:
            del current.frames[depth:]
        labels = self._label(current, frame, parent, args, kwargs, out)
        if not selected:
            return out
        probs = frame.probs if recorder.selection.wants("attention", site) else None
        if recorder.selection.wants("output", site):
            for path, value in arrays(out):
                if current.seen.get(id(value)) is value or (probs is not None and value is probs):
                    continue  # attention weights handed back: stored once, as attention
                if is_array(value) and value.ndim > 0:
                    self._take(current, module, site, part_kind("output", path), value,
                               labels[id(value)])
                elif is_array(value):
                    recorder.skip(site, part_kind("output", path), SCALAR)
        if probs is not None:
            current.seen[id(probs)] = probs
            roles = roles_for(module, "attention", tuple(probs.shape), self.hidden_size)
            which = attention_kind(module, args, kwargs, current.batch, tuple(probs.shape))
            if self.encoder_decoder:
                queries = next((v for _, v in arrays((args, kwargs)) if v.ndim > 0), None)
                side = seq2seq.side_of(current.roles_of(queries)) or seq2seq.stack_of(site)
                roles = seq2seq.attention_roles(roles, side, which)
            self._take(current, module, site, "attention", probs, roles,
                       {"attention": which} if which is not None else None)
        return out

    def _label(self, current: Pass, frame: Frame, parent: Frame | None,
               args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
               ) -> dict[int, tuple[str, ...]]:
        """Roles for every array a module call returned, by id, whether or not it is taken:
        the modules called after it inherit from them (a norm after a convolution)."""
        first = next((v for _, v in arrays((args, kwargs)) if v.ndim > 0), None)
        context = Context(
            input_roles=current.roles_of(first) if first is not None else None,
            input_shape=tuple(first.shape) if first is not None else None,
            image=frame.image or (parent.image if parent is not None else None),
            in_attention=parent is not None and parent.attention,
        )
        labels: dict[int, tuple[str, ...]] = {}
        for path, value in arrays(out):
            if value.ndim == 0:
                continue
            inherited = current.roles_of(value)
            here = Context(inherited, context.input_roles, context.input_shape,
                           context.image, context.in_attention)
            shape = tuple(value.shape)
            roles = roles_for(frame.module, part_kind("output", path), shape, self.hidden_size,
                              here)
            if inherited is None and self.encoder_decoder:
                roles = seq2seq.named(roles, seq2seq.output_side(
                    frame.module, frame.site, seq2seq.side_of(context.input_roles)))
            labels[id(value)] = roles
            current.remember(value, roles)
            image = image_layout(roles, shape)
            if image is not None:  # every enclosing call has now made this map
                frame.image = image
                for outer in current.frames:
                    outer.image = image
        return labels

    def _sided(self, roles: tuple[str, ...], side: str | None) -> tuple[str, ...]:
        return seq2seq.named(roles, side) if self.encoder_decoder else roles

    def _mark_cross_inputs(self, current: Pass, module: Any, site: str,
                           args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The keys and values handed to a Flax cross-attention index the other side's
        positions than its queries (also when nothing else says whose they are)."""
        if not isinstance(module, flax_classes("MultiHeadAttention",
                                               "MultiHeadDotProductAttention")):
            return
        if attention_kind(module, args, kwargs, current.batch, ()) != "cross":
            return
        queries = args[0] if args else kwargs.get("inputs_q")
        side = seq2seq.side_of(current.roles_of(queries)) or seq2seq.stack_of(site)
        keys: list[Any] = [args[i] if len(args) > i else kwargs.get(name)
                           for i, name in ((1, "inputs_k"), (2, "inputs_v"))]
        keys.append(kwargs.get("inputs_kv"))
        for value in keys:
            if is_array(value) and value.ndim >= 2 and current.roles_of(value) is None:
                plain = roles_for(None, "output", tuple(value.shape), self.hidden_size)
                current.remember(value, seq2seq.named(plain, seq2seq.other(side)))

    def _take(self, current: Pass, module: Any, site: str, kind: str, value: Any,
              roles: tuple[str, ...], attrs: dict[str, Any] | None = None) -> None:
        value, roles = move_batch_first(value, roles)
        item = Item(site, kind, value, roles, type(module).__name__, attrs)
        for taken in reduced(self.sink.recorder, [item], current.masks):
            if current.traced:
                current.items.append(taken)
            else:
                self.sink.put(taken)
