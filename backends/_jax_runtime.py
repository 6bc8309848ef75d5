"""How captured values reach the recorder, eagerly and from compiled JAX code.

Eagerly, a captured ``jax.Array`` goes to the recorder at once; the writer thread copies it
to the host when it is ready, so dispatch is not blocked. Under ``jax.jit`` the values are
tracers: a pass gathers them while the function is traced and hands them, at the end of the
traced call, to one ordered ``jax.debug.callback``. The compiled function keeps running as one
XLA computation and calls back to the host once per pass with the finished arrays. (An NNX
model traced directly under ``nnx.jit`` hands them out as outputs instead: ``_jax_outbox``.)

A compiled function keeps its callbacks. So that a function compiled before (or without) a
capture does not skip capturing, and one compiled during a capture does not keep capturing
after it, captures run under a JAX configuration value that is part of JAX's compilation
cache key: code traced inside a capture is cached apart from code traced outside it. The
callbacks find their capture through a registry by that value, so a function compiled in
one ``trace`` block is reused, not recompiled, by the next block with the same selection.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax

from layerscope.core import BackendError, Recorder

from ._jax_dims import to_numpy

_lock = threading.Lock()
_keys: dict[str, int] = {}
_next_key = itertools.count(1)
#: capture key -> the Sink receiving passes compiled under that key
_active: dict[int, Sink] = {}


def _make_state() -> Any:
    try:
        from jax._src import config as jax_config

        return jax_config.int_state(
            name="layerscope_capture", default=0,
            help="layerscope: the capture active while this code is traced (0: none)",
            include_in_jit_key=True, include_in_trace_context=True,
        )
    except Exception:  # an unknown JAX: fall back to clearing JAX's caches around captures
        return None


_STATE = _make_state()


def capture_key(description: str) -> int:
    """A small number that stands for one capture configuration (model and selection)."""
    with _lock:
        if description not in _keys:
            _keys[description] = next(_next_key)
        return _keys[description]


@dataclass
class Item:
    """One value taken during a pass: where, what, and how its axes are named."""

    site: str
    kind: str
    value: Any
    roles: tuple[str, ...]
    module_type: str
    #: more variable attributes (``attention``: ``self`` / ``cross``)
    attrs: dict[str, Any] | None = None


#: what a compiled pass fixes about each value: site, kind, roles, module type, attributes
Meta = tuple[str, str, tuple[str, ...], str, tuple[tuple[str, Any], ...]]


@dataclass(frozen=True)
class Outbound:
    """Where the values of one traced pass go, fixed when the pass is traced: the compiled
    function hands the same values out on every call, as arrays in this order."""

    key: int
    batch: int
    has_ids: bool
    meta: tuple[Meta, ...]
    has_decoder_ids: bool = False  # an encoder-decoder model's decoder ids follow the ids
    has_mask: bool = False  # the pass's attention mask follows them

    def deliver(self, arrays: tuple[Any, ...] | list[Any]) -> None:
        """On the host, once per executed pass."""
        sink = _active.get(self.key)
        if sink is None:
            return  # the trace block has ended; the compiled function still hands values out
        values = list(arrays)
        ids = values.pop(0) if self.has_ids else None
        decoder_ids = values.pop(0) if self.has_decoder_ids else None
        mask = values.pop(0) if self.has_mask else None
        sink.deliver(self.batch, ids, [Item(s, k, a, r, t, dict(attrs) or None)
                                       for (s, k, r, t, attrs), a
                                       in zip(self.meta, values, strict=True)], decoder_ids,
                     mask)


class Sink:
    """The recorder's doorway for one ``attach`` block: eager puts and compiled callbacks."""

    def __init__(self, recorder: Recorder, key: int) -> None:
        self.recorder = recorder
        self.key = key
        self.errors: list[BaseException] = []

    # -- eager -------------------------------------------------------------------------------

    def begin(self, batch: int, token_ids: Any, decoder_ids: Any = None, mask: Any = None
              ) -> None:
        jax.effects_barrier()  # compiled passes called earlier are recorded first, in order
        self.raise_errors()
        self.begin_compiled(batch, token_ids, decoder_ids, mask)

    def put(self, item: Item) -> None:
        self.recorder.put(item.site, item.kind, item.value, item.roles, item.module_type,
                          to_numpy, attrs=item.attrs)

    def end(self) -> None:
        if self.recorder.in_pass:
            self.recorder.end_pass()

    def abort(self) -> None:
        if self.recorder.in_pass:
            self.recorder.abort_pass()

    # -- compiled ----------------------------------------------------------------------------

    def outbound(self, batch: int, token_ids: Any, items: list[Item], decoder_ids: Any = None,
                 mask: Any = None) -> tuple[Outbound, list[Any]]:
        """Inside a traced function: this pass's values and where each goes on the host."""
        meta = tuple((i.site, i.kind, i.roles, i.module_type,
                      tuple(sorted((i.attrs or {}).items()))) for i in items)
        ids = [a for a in (token_ids, decoder_ids, mask) if a is not None]
        operands = ids + [i.value for i in items]
        return Outbound(self.key, batch, token_ids is not None, meta,
                        decoder_ids is not None, mask is not None), operands

    @staticmethod
    def callback(outbound: Outbound, operands: list[Any]) -> None:
        """Send a traced pass's values out through one ordered host callback."""
        jax.debug.callback(lambda *arrays: outbound.deliver(arrays), *operands, ordered=True)

    def emit(self, batch: int, token_ids: Any, items: list[Item], mask: Any = None) -> None:
        """Inside a traced function: send this pass's values out through a host callback."""
        self.callback(*self.outbound(batch, token_ids, items, mask=mask))

    def deliver(self, batch: int, token_ids: Any, items: list[Item],
                decoder_ids: Any = None, mask: Any = None) -> None:
        try:
            self.begin_compiled(batch, token_ids, decoder_ids, mask)
            for item in items:
                self.put(item)
            self.recorder.end_pass()
        except BaseException as exc:  # an exception must not be lost inside XLA
            self.errors.append(exc)
            try:
                self.abort()
            except BaseException:
                pass

    def begin_compiled(self, batch: int, token_ids: Any, decoder_ids: Any = None,
                       mask: Any = None) -> None:
        if self.recorder.in_pass:
            self.recorder.abort_pass()
        ids = to_numpy(token_ids) if token_ids is not None else None
        masked = {"attention_mask": to_numpy(mask)} if mask is not None else {}
        if decoder_ids is None:
            self.recorder.begin_pass(batch, ids, **masked)
        else:
            self.recorder.begin_pass(batch, ids, decoder_token_ids=to_numpy(decoder_ids),
                                     **masked)

    def wait(self) -> None:
        """Let every queued compiled pass reach the recorder (also those of a function
        compiled in an earlier block, which runs here without being traced again)."""
        jax.effects_barrier()

    def raise_errors(self) -> None:
        if self.errors:
            error, self.errors = self.errors[0], []
            if isinstance(error, Exception) and not isinstance(error, BackendError):
                raise BackendError(
                    f"a compiled pass could not be recorded: {error}") from error
            raise error


@contextmanager
def uncaptured() -> Iterator[None]:
    """Run eager code as outside any capture. The capture key is part of the cache key of
    JAX's eager operations too; an eager pass needs no key (its wrappers run in Python), and
    without one it reuses the operations JAX compiled before instead of compiling each again."""
    if _STATE is None:
        yield
        return
    with _STATE(0):
        yield


@contextmanager
def activated(sink: Sink) -> Iterator[None]:
    """Register ``sink`` for its key and trace/compile under that key; always undone."""
    with _lock:
        if sink.key in _active:
            raise BackendError(
                "this model is already being traced with the same selection; finish that "
                "'with layerscope.trace(...)' block first"
            )
        _active[sink.key] = sink
    try:
        if _STATE is None:
            jax.clear_caches()
            try:
                yield
            finally:
                jax.clear_caches()
        else:
            with _STATE(sink.key):
                yield
    finally:
        try:
            sink.wait()
        finally:
            with _lock:
                _active.pop(sink.key, None)
