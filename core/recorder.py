"""The sink backends write to: names, labels and attributes on top of the streaming writer.

A backend calls :meth:`Recorder.begin_pass` when the model's forward starts,
:meth:`Recorder.put` for each tensor it captures (batch axis first), and
:meth:`Recorder.end_pass` when the forward returns. Core does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._reduce_numpy import OPS as NUMPY_OPS
from .collector import freeze_trace_objects
from .direct import SitePut
from .errors import CaptureError
from .format import (
    DECODER_TOKEN_ID,
    DECODER_TOKEN_MASK,
    DECODER_TOKEN_STEP,
    DECODER_TOKEN_TEXT,
    INPUT_TEXT,
    SKIPPED,
    STATUS_ABORTED,
    STATUS_COMPLETE,
    TOKEN_ID,
    TOKEN_MASK,
    TOKEN_STEP,
    TOKEN_TEXT,
    skipped_sites,
)
from .naming import layer_index, stack_of, variable_name
from .reduce import FULL, ArrayOps, PassMasks, Piece, apply_chains
from .region import Region
from .selection import Selection
from .writer import TraceWriter
from .writerecords import Snapshot, ToNumpy, as_numpy

TokenDecoder = Callable[[Sequence[int]], list[str]]

#: why a scalar is not stored (``skipped``): every stored variable has a row per sample
SCALAR = ("a scalar (0-d, e.g. a loss or a counter): no batch axis to store it along; have "
          "the module return one value per sample, shape (batch,), to capture it")


class Recorder:
    """Turns ``(site, kind, tensor, roles)`` from a backend into labeled, appended variables."""

    def __init__(self, writer: TraceWriter, selection: Selection, framework: str,
                 decode_tokens: TokenDecoder | None = None) -> None:
        self.writer = writer
        self.selection = selection
        self.framework = framework
        self.decode_tokens = decode_tokens
        #: set by a backend that traces an encoder-decoder model: each variable then records
        #: the stack its site's path names (elsewhere a module called ``decoder`` is no stack)
        self.encoder_decoder = False
        self._calls: dict[tuple[str, str], int] = {}
        #: (site, kind) -> the name of its first call's variable (see direct_site)
        self._first_names: dict[tuple[str, str], str] = {}
        self._texts: list[str] | None = None
        # site@kind -> why it is not captured; a store appended to keeps its earlier record
        self.skipped: dict[str, str] = skipped_sites(writer.attrs)
        self._recorded = dict(self.skipped)  # what the store's attributes hold already
        self.passes = 0
        self.captured = False  # whether any captured tensor (not a label) reached the writer
        #: token axis -> (mask coordinate, mask) of the pass under way, stored as it ends
        self._masks: dict[str, tuple[str, np.ndarray]] = {}
        #: whether the backend reduces tensors itself (calls :meth:`reduce`)
        self._backend_reduces = False

    # -- pass boundaries ---------------------------------------------------------------------

    @property
    def in_pass(self) -> bool:
        return self.writer.batch_size is not None

    @property
    def batch_size(self) -> int | None:
        return self.writer.batch_size

    def set_texts(self, texts: Sequence[str]) -> None:
        """Label the next pass with the input strings it was made from."""
        self._texts = [str(t) for t in texts]

    def begin_pass(self, batch_size: int, token_ids: Any = None,
                   decoder_token_ids: Any = None, attention_mask: Any = None,
                   decoder_attention_mask: Any = None) -> None:
        """A pass of ``batch_size`` samples starts. ``attention_mask`` (and the decoder's):
        which of ``token_ids`` are real tokens (left or right padding); stored as the
        ``token_mask`` coordinate, all True where no mask (or one of another shape) is given.
        Positions past the pass's length, in a store that holds longer passes, are False."""
        self.writer.begin_batch(batch_size)
        self._calls.clear()
        self._masks = {}
        texts, self._texts = self._texts, None
        if texts is not None:
            if len(texts) != batch_size:
                raise CaptureError(
                    f"{len(texts)} input texts were given for a batch of {batch_size} samples"
                )
            self.writer.put(INPUT_TEXT, np.asarray(texts, dtype=str), ("batch",), {})
        if token_ids is not None:
            self._put_tokens(np.asarray(token_ids), attention_mask,
                             (TOKEN_ID, TOKEN_TEXT, TOKEN_MASK), "token")
        if decoder_token_ids is not None:
            self._put_tokens(np.asarray(decoder_token_ids), decoder_attention_mask,
                             (DECODER_TOKEN_ID, DECODER_TOKEN_TEXT, DECODER_TOKEN_MASK),
                             "decoder_token")

    def end_pass(self) -> None:
        self._put_masks()
        self.writer.end_batch()
        self.passes += 1
        freeze_trace_objects(self.passes)
        if self.skipped != self._recorded:
            self._record_skipped()

    def abort_pass(self) -> None:
        self._masks = {}
        self.writer.discard_batch()

    def put_decoder_tokens(self, token_ids: Any) -> None:
        """Label the decoder's positions of the pass under way with ``token_ids`` (batch,
        decoder_token), where the backend sees them only once the model built them; at most
        once per pass, instead of ``begin_pass(decoder_token_ids=...)``."""
        if self.writer.batch_size is not None:
            self._put_tokens(np.asarray(token_ids), None,
                             (DECODER_TOKEN_ID, DECODER_TOKEN_TEXT, DECODER_TOKEN_MASK),
                             "decoder_token")

    def put_token_ids(self, axis: str, token_ids: Any) -> None:
        """Label ``axis`` (``token`` or ``decoder_token``) of the pass under way with
        ``token_ids`` (batch, position) where they are known only as it ends (a traced
        ``generate()``), instead of ``begin_pass(token_ids=...)``."""
        names = {"token": (TOKEN_ID, TOKEN_TEXT, TOKEN_MASK),
                 "decoder_token": (DECODER_TOKEN_ID, DECODER_TOKEN_TEXT, DECODER_TOKEN_MASK)}
        if self.writer.batch_size is not None:
            self._put_tokens(np.asarray(token_ids), None, names[axis], axis)

    def put_token_labels(self, axis: str, steps: np.ndarray | None = None,
                         mask: np.ndarray | None = None) -> None:
        """Label ``axis`` (``token`` or ``decoder_token``) of a pass made from ``generate()``:
        ``steps`` (batch, position) the step that made each position (0: the prompt),
        ``mask`` whether it holds a real token (it replaces the pass's attention mask)."""
        names = {"token": (TOKEN_STEP, TOKEN_MASK),
                 "decoder_token": (DECODER_TOKEN_STEP, DECODER_TOKEN_MASK)}[axis]
        if steps is not None:
            self.writer.put(names[0], steps.astype(np.int64), ("batch", axis), {})
        if mask is not None:
            self._masks[axis] = (names[1], mask.astype(bool))

    def _put_masks(self) -> None:
        """Store the pass's token masks, once each, as the pass ends (a backend may replace
        the one ``begin_pass`` made until then)."""
        masks, self._masks = self._masks, {}
        for axis, (name, mask) in masks.items():
            self.writer.put(name, mask, ("batch", axis),
                            {"description": "True where the sample has a real token"})

    def _put_tokens(self, ids: np.ndarray, mask: Any, names: tuple[str, str, str],
                    axis: str) -> None:
        id_name, text_name, mask_name = names
        if ids.ndim != 2:
            return
        self.writer.put(id_name, ids.astype(np.int64), ("batch", axis), {})
        real = np.asarray(mask) if mask is not None else None
        if real is None or real.shape != ids.shape:
            real = np.ones(ids.shape, dtype=bool)
        self._masks[axis] = (mask_name, real.astype(bool))
        if self.decode_tokens is not None:
            texts = np.asarray([self.decode_tokens(row.tolist()) for row in ids], dtype=str)
            self.writer.put(text_name, texts, ("batch", axis), {})

    # -- captured tensors --------------------------------------------------------------------

    def put(self, site: str, kind: str, tensor: Any, roles: tuple[str, ...],
            module_type: str = "", to_numpy: ToNumpy = as_numpy,
            snapshot: Snapshot | None = None, attrs: Mapping[str, Any] | None = None,
            region: Region | None = None, call_index: int | None = None) -> None:
        """Queue one captured tensor whose first axis is the batch. ``attrs``: more variable
        attributes the backend knows (``attention``: ``self`` or ``cross``). ``region``: the
        tensor is a piece of the variable (:mod:`.region`), whose ``call_index`` (the site's
        call within the pass) the backend counts itself: the pieces of one call are several
        puts."""
        batch = self.writer.batch_size
        if batch is None:
            return  # a call outside any traced pass (the backend's own bookkeeping)
        if variable_name(site, kind) in self.skipped:
            return  # skipped once, always: a broadcast (1, ...) tensor must not fill batch 1 only
        shape = tuple(int(n) for n in tensor.shape)
        if not shape:
            self.skip(site, kind, SCALAR)
            return
        if shape[0] != batch:
            # e.g. position or rotary embeddings, computed once and broadcast over the batch
            self.skip(site, kind, f"shape {shape} has no leading batch axis of {batch}")
            return
        if (self.selection.reduces and not self._backend_reduces and ":" not in kind
                and region is None):
            self._reduce_on_host(site, kind, tensor, roles, module_type, to_numpy, snapshot,
                                 attrs)
            return
        self._store(site, kind, tensor, roles, module_type, to_numpy, snapshot, attrs, region,
                    call_index)

    def skip(self, site: str, kind: str, reason: str) -> None:
        """Store nothing of ``(site, kind)`` in this trace, and record ``reason`` (a backend
        that cannot copy the tensor, e.g. of a dtype NumPy has no type for)."""
        if self.writer.batch_size is not None:
            self.skipped.setdefault(variable_name(site, kind), reason)

    def direct_site(self, site: str, kind: str) -> SitePut | None:
        """The way for ``(site, kind)`` straight into the writer (its variable's chunk
        memory, or pool memory queued for writing), for a backend to keep
        (:meth:`.direct.SitePut.put`: :meth:`put` of the site's first call in a pass, taken
        as an earlier pass took it, no labeling run again); None where its variable is not
        settled yet (a backend asks again later: the first batch decides gathering) or the
        selection reduces tensors."""
        key = (site, kind)
        name = self._first_names.get(key)
        slot = None if name is None or self.selection.reduces else self.writer.direct_slot(name)
        return None if slot is None else SitePut(self, self._calls, key, slot)

    def _store(self, site: str, kind: str, tensor: Any, roles: tuple[str, ...],
               module_type: str, to_numpy: ToNumpy, snapshot: Snapshot | None,
               attrs: Mapping[str, Any] | None, region: Region | None = None,
               call_index: int | None = None) -> None:
        if call_index is None:
            call_index = self._calls.get((site, kind), 0)
            self._calls[(site, kind)] = call_index + 1
        name, labels = self._labels(site, kind, call_index, module_type, attrs)
        self.writer.put(name, tensor, roles, labels, to_numpy, snapshot, region)
        self.captured = True
        if call_index == 0 and region is None:
            self._first_names[(site, kind)] = name

    def declare(self, site: str, kind: str, call_index: int, shape: tuple[int, ...],
                roles: tuple[str, ...], module_type: str = "",
                attrs: Mapping[str, Any] | None = None) -> None:
        """Name a variable of the pass under way, of ``shape`` (batch first), before its
        pieces come (:meth:`put` with ``region``): it takes its place among the variables
        (their ``order``) where the model made it, not where its first piece is written."""
        if self.writer.batch_size is None or variable_name(site, kind) in self.skipped:
            return
        if not shape or shape[0] != self.writer.batch_size:
            return  # put() records why
        name, labels = self._labels(site, kind, call_index, module_type, attrs)
        self.writer.declare(name, roles, shape, labels)
        self.captured = True

    def limit_pending(self, nbytes: int | None) -> None:
        """Hold at most ``nbytes`` of queued tensors, the writer's budget notwithstanding,
        until called with None (see :meth:`.TraceWriter.limit_pending`)."""
        self.writer.limit_pending(nbytes)

    def _labels(self, site: str, kind: str, call_index: int, module_type: str,
                attrs: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """A variable's name and attributes."""
        name = variable_name(site, _numbered(kind, call_index))
        labels: dict[str, Any] = {
            "site": site, "kind": kind, "module_type": module_type,
            "framework": self.framework, "call_index": call_index,
        }
        layer = layer_index(site)
        if layer is not None:
            labels["layer"] = layer
        stack = stack_of(site) if self.encoder_decoder else None
        if stack is not None:
            labels["stack"] = stack
        labels.update(attrs or {})
        return name, labels

    def add_attrs(self, site: str, kind: str, call_index: int, attrs: dict[str, Any]) -> None:
        """More attributes of a variable this trace created, known only once its pass is
        over (a traced ``generate()``'s positions no step computed)."""
        self.writer.update_attrs(variable_name(site, _numbered(kind, call_index)), attrs)

    def reduce(self, site: str, kind: str, tensor: Any, roles: tuple[str, ...], ops: ArrayOps,
               masks: PassMasks) -> list[Piece]:
        """What to :meth:`put` of ``tensor`` (taken as ``kind`` at ``site``, batch first): the
        tensor itself, and/or the reductions the selection asks for there (:mod:`.reduce`),
        computed now with the backend's ``ops`` on the tensor's device. ``masks``: the pass's
        real-token masks as the framework's tensors. A backend calls it in its hook, before
        anything is copied off the device; it needs no pass open (JAX calls it while a
        compiled pass is traced)."""
        if not self.selection.reduces:
            return [Piece(kind, tensor, roles)]
        self._backend_reduces = True
        chains = self.selection.chains(kind, site)
        shape = tuple(getattr(tensor, "shape", ()))
        if chains == (FULL,) or not chains or not shape or not masks.batched(shape[0]):
            return [Piece(kind, tensor, roles)]  # put stores it, or records why it cannot
        pieces, skipped = apply_chains(chains, kind, tensor, roles, ops, masks)
        for spec, why in skipped.items():
            self.skipped.setdefault(variable_name(site, spec), why)
        return pieces

    def _reduce_on_host(self, site: str, kind: str, tensor: Any, roles: tuple[str, ...],
                        module_type: str, to_numpy: ToNumpy, snapshot: Snapshot | None,
                        attrs: Mapping[str, Any] | None) -> None:
        """The reductions of a whole tensor from a backend that does not call :meth:`reduce`,
        computed in NumPy: the host copy is whole, but the store holds what was asked."""
        if snapshot is not None:
            tensor = snapshot(tensor, lambda shape, dtype: np.empty(shape, dtype))
        array = to_numpy(tensor)
        masks = PassMasks(self.writer.batch_size,
                          *(self._masks[a][1] if a in self._masks else None
                            for a in ("token", "decoder_token")))
        pieces = self.reduce(site, kind, array, roles, NUMPY_OPS, masks)
        self._backend_reduces = False  # reduce() took this backend for one that reduces
        for piece in pieces:
            self._store(site, piece.kind, piece.value, piece.roles, module_type, as_numpy,
                        None, {**(attrs or {}), **piece.attrs})

    def _record_skipped(self) -> None:
        """Write the skipped sites to the group attributes (published with the next commits)."""
        self._recorded = dict(self.skipped)
        self.writer.set_attrs(**{SKIPPED: self._recorded})

    # -- end ---------------------------------------------------------------------------------

    def close(self, failed: bool = False) -> None:
        """Flush everything; the store ends ``complete``, or ``aborted`` after a failure.

        Never waits on a writer that failed: its error is raised here as a
        :class:`WriterError`. When even the status cannot be written, the store keeps saying
        ``writing``, with every committed batch intact.
        """
        try:
            try:
                if self.in_pass:
                    if failed:
                        self.writer.discard_batch()
                    else:
                        self._put_masks()
                        self.writer.end_batch()
            finally:
                self.writer.close()
        except BaseException:
            failed = True
            raise
        finally:
            self._finish(failed)

    def _finish(self, failed: bool) -> None:
        failed = failed or self.writer.failed
        committed, samples = self.writer.committed
        self._recorded = dict(self.skipped)
        try:
            self.writer.set_attrs(
                status=STATUS_ABORTED if failed else STATUS_COMPLETE,
                committed_batches=committed, committed_samples=samples,
                **{SKIPPED: self._recorded},
            )
        except BaseException:
            if not failed:
                self.writer.raise_if_failed()
                raise
            # already failing: that error is the one raised; the store still says "writing"
        finally:
            self.writer.release()


def _numbered(kind: str, call_index: int) -> str:
    """The kind of a module's ``call_index``-th call in a pass: ``output.call1``; a reduction
    numbers the kind it reduces (``output.call1:last(token)``)."""
    if call_index == 0:
        return kind
    taken, sep, steps = kind.partition(":")
    return f"{taken}.call{call_index}{sep}{steps}"
