"""``model.generate(...)`` inside a trace: one generated sequence is one sample.

Generation runs the model once over the prompt (the prefill) and then once per new token over
a key/value cache. Stored pass by pass, the decode steps would not fit the prompt's shapes, and
a sample would be a fragment of a sequence. While attached, ``generate`` is wrapped instead:
each forward call inside it is a *step*, and all of them make one pass over the final
sequences (prompt plus generated tokens), begun at the first step. Each step's captured
tensors are copied to the host and placed at their positions as they come; a block of
positions is written once the steps have moved past it (:mod:`._torch_generate_stream`), so
memory holds a block per variable, not the generation. The token labels are written when
``generate`` returns.

Where each step's values go (positions are absolute, 0 = the first prompt position, left
padding included):

- a step fed ``L`` tokens computes the positions ``[end - L, end)``, ``end`` being the tokens
  fed so far; a ``token`` or ``query`` axis of length ``n <= L`` holds the last ``n`` of them
  (``logits_to_keep=1``: the prefill's logits are the last prompt position only);
- a ``key`` axis of length ``K`` holds the keys the cache gave the step: the last ``K``
  positions up to ``end`` (a sliding-window cache keeps only the last keys), or the positions
  ``[0, K)`` when ``K`` exceeds ``end`` (a static cache, preallocated to its full length).

Attention rows of computed queries get 0 for keys the step had no key for: a future position
or one the sliding window dropped cannot be attended. Positions no step computed (the last
generated token is never fed back; prompt logits under ``logits_to_keep``; the tail of a
sequence whose generation stopped early) hold NaN, and the variable's ``filled`` attribute
says which and why. The coordinates ``token_step`` (0 for the prompt, k for the k-th generated
token) and ``token_mask`` (False for padding: left padding of the prompt and the pad tokens
``generate`` appends to a finished sequence) label the ``token`` axis.

An encoder-decoder model's encoder runs once, called by ``generate`` itself rather than through
the model's forward: that call is a step of its own, stored as it is on ``token``; the decoder's
steps are assembled on ``decoder_token`` / ``decoder_query`` / ``decoder_key`` by the same rules
(cross-attention: one row per step over the encoder's positions), labeled by
``decoder_token_step`` and ``decoder_token_mask``. A value on the encoder's positions only that a
decoder step hands on (the encoder's last hidden state in every step's output) is stored once
when every step gave the same.

Greedy decoding and sampling are supported; beam search and assisted decoding are refused
before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from layerscope.core import Recorder, Selection
from layerscope.core.errors import CaptureError
from layerscope.core.naming import variable_name
from layerscope.core.writerecords import Snapshot, ToNumpy

from ._torch_generate_assembly import token_labels
from ._torch_generate_request import GenerateRequest, read_request, sequences_of
from ._torch_generate_stream import Geometry, HeldVariable, Origin, StreamedVariable

#: blocks of each streamed variable the writer may hold waiting for the disk at once
PENDING_BLOCKS = 1


@dataclass
class _Step:
    start: int  # absolute position of the first token fed to this step
    length: int  # tokens fed to this step
    encoder: bool = False  # an encoder-decoder model's encoder pass, run once before the steps
    calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (site, kind) -> calls


def _new_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


class StepCollector:
    """Stands in for the recorder while ``generate`` runs: each forward call is one step,
    whose tensors are copied to the host and placed in the one pass that stores the final
    sequences, written as the steps come (:mod:`._torch_generate_stream`)."""

    def __init__(self, recorder: Recorder, request: GenerateRequest) -> None:
        self.recorder = recorder
        self.request = request
        self.selection: Selection = recorder.selection
        self.encoder_decoder = recorder.encoder_decoder
        self.prefix = "decoder_" if self.encoder_decoder else ""
        self.streamed: dict[tuple[str, str, int], StreamedVariable] = {}
        self.held: dict[tuple[str, str, int], HeldVariable] = {}
        self.skipped: set[tuple[str, str]] = set()  # no batch axis: the recorder said why
        self.prompt_length: int | None = None  # the first decoding step's tokens
        self.length: int | None = None  # the stored sequences' length
        self._current: _Step | None = None
        self._last: _Step | None = None  # the last decoding step that ended
        self._batch: int | None = None
        self._fed = 0
        self._pending_bytes = 0  # a block of each streamed variable

    @property
    def in_pass(self) -> bool:
        return self._current is not None

    @property
    def batch_size(self) -> int | None:
        return self._batch if self._current is not None else None

    def begin_pass(self, batch_size: int, token_ids: Any = None,
                   decoder_token_ids: Any = None, attention_mask: Any = None,
                   decoder_attention_mask: Any = None) -> None:
        # the steps' attention masks are not kept: the pass labels its positions with the
        # generation's own mask (Recorder.put_token_labels)
        del attention_mask, decoder_attention_mask
        fed = decoder_token_ids if self.encoder_decoder else token_ids
        if fed is None or np.ndim(fed) != 2:
            raise CaptureError(
                "generate() inside a trace needs the tokens of each step ("
                + ("decoder_input_ids" if self.encoder_decoder else "input_ids")
                + "): the steps are placed by them")
        count = int(np.shape(fed)[1])
        if self.prompt_length is None:  # the decoder's prompt: its start token(s)
            self.prompt_length = count if self.encoder_decoder else \
                int(self.request.prompt_ids.shape[1])
            self.length = self.request.stored_length(self.prompt_length)
        self._begin(batch_size, _Step(self._fed, count))
        self._fed += count

    def begin_encoder(self, batch_size: int, length: int) -> None:
        """The encoder pass of an encoder-decoder model, which generate() runs on its own."""
        self._begin(batch_size, _Step(0, length, encoder=True))

    def _begin(self, batch_size: int, step: _Step) -> None:
        if self._batch is not None and batch_size != self._batch:
            raise CaptureError(f"a generate() step has {batch_size} samples, the prompt had "
                               f"{self._batch}")
        if self._batch is None:  # the first step: the stored pass begins
            request = self.request
            if self.encoder_decoder:
                self.recorder.begin_pass(batch_size, token_ids=request.prompt_ids.numpy(),
                                         attention_mask=request.prompt_mask.numpy())
            else:
                self.recorder.begin_pass(batch_size)
        self._batch = batch_size
        self._current = step

    def skip(self, site: str, kind: str, reason: str) -> None:
        if self._current is not None:
            self.skipped.add((site, kind))
            self.recorder.skip(site, kind, reason)

    def put(self, site: str, kind: str, tensor: Any, roles: tuple[str, ...],
            module_type: str = "", to_numpy: ToNumpy | None = None,
            snapshot: Snapshot | None = None, attrs: Any = None) -> None:
        step = self._current
        if step is None or to_numpy is None or (site, kind) in self.skipped:
            return
        call = step.calls.get((site, kind), 0)
        step.calls[(site, kind)] = call + 1
        if tensor.dim() < 1 or tensor.shape[0] != self._batch:
            self.skipped.add((site, kind))  # no batch axis: the recorder records it as skipped
            self.recorder.put(site, kind, tensor, tuple(roles), module_type)
            return
        key = (site, kind, call)
        streamed = self.streamed.get(key)
        # copied now, out of the model's memory (it may reuse the tensor later): a streamed
        # variable's into the same memory each step, a held one's into memory of its own
        alloc = streamed.stage if streamed is not None else _new_array
        value = to_numpy(snapshot(tensor, alloc)) if snapshot is not None else \
            np.array(to_numpy(tensor), copy=True)
        if streamed is None and key not in self.held:
            origin = Origin(site, kind, call, tuple(roles), module_type, dict(attrs or {}))
            streamed = self._first(origin, value, step)
        if streamed is not None:
            streamed.add(self.recorder, value, step.start + step.length)
        else:
            self.held[key].add(value, step.start, step.length)

    def _first(self, origin: Origin, value: np.ndarray, step: _Step) -> StreamedVariable | None:
        """A variable seen for the first time: streamed where it has a token/query axis of
        a decoding step, held otherwise."""
        key = (origin.site, origin.kind, origin.call)
        geometry = Geometry.of(origin.roles, self.prefix)
        if step.encoder or len(geometry.queries) != 1 or self.length is None:
            self.held[key] = HeldVariable(origin, geometry)
            return None
        variable = StreamedVariable(origin, geometry, value, self.length)
        self.recorder.declare(origin.site, origin.kind, origin.call, variable.shape,
                              origin.roles, origin.module_type,
                              {**origin.attrs, "generated": True})
        self.streamed[key] = variable
        # the writer may hold a block per variable waiting for the disk, not its whole
        # budget: the steps wait for it instead (a prompt fills many blocks at once, and a
        # writer slower than the model would queue every step's), so memory stays a few
        # blocks per variable however long the generation and however slow the disk
        self._pending_bytes += variable.block_bytes
        self.recorder.limit_pending(PENDING_BLOCKS * self._pending_bytes)
        return variable

    def end_pass(self) -> None:
        if self._current is not None and not self._current.encoder:
            self._last = self._current
        self._current = None

    def abort_pass(self) -> None:
        self._current = None

    @property
    def fed(self) -> int:
        """Tokens fed to the decoding steps."""
        return self._last.start + self._last.length if self._last is not None else 0

    def stop(self) -> None:
        """generate() failed: the stored pass is given up."""
        if self.recorder.in_pass:
            self.recorder.abort_pass()


class GenerateWrapper:
    """Wraps ``model.generate`` for an attach block; the capture's recorder is swapped for a
    :class:`StepCollector` while it runs."""

    def __init__(self, model: nn.Module, capture: Any) -> None:
        self.model = model
        self.capture = capture  # whose ``recorder`` the hooks call

    @contextmanager
    def installed(self) -> Iterator[None]:
        original = getattr(self.model, "generate", None)
        if original is None or "generate" in vars(self.model):
            yield  # no generate(), or one set on the instance already: left alone
            return

        def generate(*args: Any, **kwargs: Any) -> Any:
            return self.run(original, args, kwargs)

        self.model.generate = generate  # type: ignore[method-assign,assignment]  # instance only
        try:
            yield
        finally:
            del self.model.generate

    def run(self, original: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        recorder = self.capture.recorder
        if recorder.in_pass:
            recorder.abort_pass()  # a forward before this one raised where no hook saw it
        request = read_request(self.model, args, kwargs)
        collector = StepCollector(recorder, request)
        self.capture.recorder = collector
        try:
            try:
                with self._encoder_pass(collector):
                    output = original(*args, **kwargs)
            finally:
                self.capture.recorder = recorder
            _finish(recorder, collector, request, sequences_of(output))
        except BaseException:
            collector.stop()
            raise
        finally:
            recorder.limit_pending(None)
        return output

    @contextmanager
    def _encoder_pass(self, collector: StepCollector) -> Iterator[None]:
        """An encoder-decoder model's encoder, which generate() calls by itself (not through
        the model's forward), as a step of its own."""
        get_encoder = getattr(self.model, "get_encoder", None)
        encoder = get_encoder() if collector.encoder_decoder and callable(get_encoder) else None
        if not isinstance(encoder, nn.Module):
            yield
            return

        def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = next((t for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"),
                                      *args) if isinstance(t, torch.Tensor)), None)
            if first is not None and first.dim() >= 2 and not collector.in_pass:
                collector.begin_encoder(int(first.shape[0]), int(first.shape[1]))

        def end(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            collector.end_pass()

        handles = [encoder.register_forward_pre_hook(begin, with_kwargs=True, prepend=True),
                   encoder.register_forward_hook(end, with_kwargs=True)]  # after the capture's
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _finish(recorder: Recorder, collector: StepCollector, request: GenerateRequest,
            sequences: torch.Tensor) -> None:
    """The pass's last pieces, its held variables and its token labels (an encoder-decoder
    model's: the prompt on ``token``, the decoder's sequences on ``decoder_token``)."""
    length, prompt_length = collector.length, collector.prompt_length
    if length is None or prompt_length is None or not recorder.in_pass:
        return  # no decoding step ran
    seq2seq = collector.encoder_decoder
    # the decoder's prompt: its start token(s), all real
    prompt_mask = torch.ones(len(sequences), prompt_length) if seq2seq else request.prompt_mask
    labels = token_labels(sequences, prompt_length, prompt_mask, length,
                          request.pad_token_id, request.eos_token_ids)
    fed = collector.fed
    if fed != sequences.shape[1] - 1:  # every token but the last generated one is fed once
        raise CaptureError(
            f"generate() fed the model {fed} tokens for sequences of {sequences.shape[1]}: it "
            "was given a cache holding part of them already, and positions computed outside "
            "the trace cannot be placed; trace generate() from an empty cache")
    axis = "decoder_token" if seq2seq else "token"
    recorder.put_token_ids(axis, labels.ids)
    recorder.put_token_labels(axis, labels.steps, labels.mask)
    for streamed in collector.streamed.values():
        streamed.finish(recorder, fed, prompt_length)
    for held in collector.held.values():
        origin = held.origin
        result = held.result(labels.length, fed, prompt_length, collector.prefix)
        if isinstance(result, str):
            recorder.skipped[variable_name(
                origin.site, f"{origin.kind}.call{origin.call}" if origin.call else
                origin.kind)] = result
            continue
        attrs = {**origin.attrs, "generated": True}
        if result.filled:
            attrs["filled"] = result.filled
        recorder.put(origin.site, origin.kind, result.values, origin.roles,
                     origin.module_type, attrs=attrs, call_index=origin.call)
    recorder.end_pass()
