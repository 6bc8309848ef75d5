"""``model.generate(...)`` inside a trace: one generated sequence is one sample.

Generation runs the model once over the prompt (the prefill) and then once per new token over
a key/value cache. Stored pass by pass, the decode steps would not fit the prompt's shapes, and
a sample would be a fragment of a sequence. While attached, ``generate`` is wrapped instead:
each forward call inside it is a *step* whose captured tensors are kept as host copies, and
when ``generate`` returns, each variable is assembled along its position axes and handed to
the recorder as one pass over the final sequences (prompt plus generated tokens).

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

Greedy decoding and sampling are supported; beam search, assisted decoding and
encoder-decoder models are refused before anything runs.
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
from layerscope.core.format import TOKEN_ID
from layerscope.core.naming import variable_name
from layerscope.core.writer import Snapshot, ToNumpy

from ._torch_generate_assembly import Assembled, assemble, token_labels


@dataclass
class _Put:
    site: str
    kind: str
    value: Any  # host NumPy copy, or the tensor as it came (no batch axis: the recorder skips)
    roles: tuple[str, ...]
    module_type: str
    attrs: dict[str, Any]


def _new_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


@dataclass
class _Step:
    start: int  # absolute position of the first token fed to this step
    length: int  # tokens fed to this step
    puts: list[_Put] = field(default_factory=list)


class StepCollector:
    """Stands in for the recorder while ``generate`` runs: each forward call is one step whose
    tensors are copied to the host and kept, not written."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.selection: Selection = recorder.selection
        self.encoder_decoder = recorder.encoder_decoder
        self.steps: list[_Step] = []
        self._current: _Step | None = None
        self._batch: int | None = None
        self._fed = 0

    @property
    def in_pass(self) -> bool:
        return self._current is not None

    @property
    def batch_size(self) -> int | None:
        return self._batch if self._current is not None else None

    def begin_pass(self, batch_size: int, token_ids: Any = None,
                   decoder_token_ids: Any = None) -> None:
        if token_ids is None or np.ndim(token_ids) != 2:
            raise CaptureError("generate() inside a trace needs input_ids: the steps are placed "
                               "by the tokens fed to each")
        if self._batch is not None and batch_size != self._batch:
            raise CaptureError(f"a generate() step has {batch_size} samples, the prompt had "
                               f"{self._batch}")
        self._batch = batch_size
        length = int(np.shape(token_ids)[1])
        self._current = _Step(self._fed, length)
        self._fed += length

    def put(self, site: str, kind: str, tensor: Any, roles: tuple[str, ...],
            module_type: str = "", to_numpy: ToNumpy | None = None,
            snapshot: Snapshot | None = None, attrs: Any = None) -> None:
        step = self._current
        if step is None or to_numpy is None:
            return
        if tensor.dim() >= 1 and tensor.shape[0] == self._batch:
            # copied now, into memory of its own: the model may reuse the tensor's later
            value = to_numpy(snapshot(tensor, _new_array)) if snapshot is not None else \
                np.array(to_numpy(tensor), copy=True)
        else:
            value = tensor  # no batch axis: the recorder records it as skipped
        step.puts.append(_Put(site, kind, value, tuple(roles), module_type, dict(attrs or {})))

    def end_pass(self) -> None:
        if self._current is not None:
            self.steps.append(self._current)
        self._current = None

    def abort_pass(self) -> None:
        self._current = None


@dataclass(frozen=True)
class _Request:
    """What one ``generate`` call was asked to do, as far as the stored shape depends on it."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    total_length: int | None  # prompt + max_new_tokens, where known
    pad_token_id: int
    eos_token_ids: tuple[int, ...]


def _refuse_unsupported(model: nn.Module, config: Any, kwargs: dict[str, Any]) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise CaptureError(
            "generate() of an encoder-decoder model is not traced yet; trace its forward "
            "passes (model(input_ids=..., decoder_input_ids=...)) or generate outside the trace")
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if int(beams) > 1:
        raise CaptureError(
            f"generate(num_beams={beams}) cannot be traced: beam search reorders and drops "
            "hypotheses between steps. Greedy decoding and sampling (do_sample=True) work")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise CaptureError(
            "assisted generation cannot be traced: its steps verify several tokens at once. "
            "Greedy decoding and sampling (do_sample=True) work")


def _request(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Request:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    _refuse_unsupported(model, config, kwargs)
    ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise CaptureError("generate() inside a trace needs the prompt as input_ids, "
                           "(batch, token) integers")
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask

    def setting(name: str) -> Any:
        value = kwargs.get(name)
        return getattr(config, name, None) if value is None else value

    new_tokens, max_length = setting("max_new_tokens"), setting("max_length")
    total = ids.shape[1] + int(new_tokens) if new_tokens is not None else \
        int(max_length) if kwargs.get("max_length") is not None else None
    eos = setting("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos.tolist() if isinstance(eos, torch.Tensor) else eos)) \
        if isinstance(eos, (list, tuple, torch.Tensor)) else ((int(eos),) if eos is not None
                                                              else ())
    pad = setting("pad_token_id")
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
    return _Request(ids.detach().cpu(), mask.detach().cpu(), total, pad_id, eos_ids)


def _sequences(output: Any) -> torch.Tensor:
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(sequences, torch.Tensor):
        raise CaptureError("generate() returned no sequences to label the trace with")
    return sequences.detach().cpu()


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
        request = _request(self.model, args, kwargs)
        collector = StepCollector(recorder)
        self.capture.recorder = collector
        try:
            output = original(*args, **kwargs)
        finally:
            self.capture.recorder = recorder
        _record(recorder, collector, request, _sequences(output))
        return output


def _record(recorder: Recorder, collector: StepCollector, request: _Request,
            sequences: torch.Tensor) -> None:
    """The collected steps as one pass over the final sequences."""
    if not collector.steps:
        return
    labels = token_labels(sequences, request.prompt_ids.shape[1], request.prompt_mask,
                          request.total_length, request.pad_token_id, request.eos_token_ids)
    computed = collector.steps[-1].start + collector.steps[-1].length
    _check_length(recorder, labels.length, request.prompt_ids.shape[1])
    try:
        recorder.begin_pass(int(sequences.shape[0]), token_ids=labels.ids)
        recorder.put_token_labels(labels.steps, labels.mask)
        unstored: set[tuple[str, str]] = set()
        for (site, kind, call), parts in _by_variable(collector.steps).items():
            first = parts[0][1]
            if (site, kind) in unstored:
                continue  # an earlier call was not stored: the recorder would misnumber this
            if not isinstance(first.value, np.ndarray):
                recorder.put(site, kind, first.value, first.roles, first.module_type)
                continue
            result = assemble([(step.start, step.length, put.value, put.roles)
                               for step, put in parts], labels.length, computed,
                              request.prompt_ids.shape[1])
            if isinstance(result, str):
                recorder.skipped[variable_name(site, f"{kind}.call{call}" if call else kind)] = \
                    result
                unstored.add((site, kind))
                continue
            _put(recorder, site, kind, first, result)
    except BaseException:
        if recorder.in_pass:
            recorder.abort_pass()
        raise
    recorder.end_pass()


def _check_length(recorder: Recorder, length: int, prompt_length: int) -> None:
    """A store holds sequences of one length: say so in generation's own terms."""
    stored = recorder.writer.variables.get(TOKEN_ID)
    if stored is not None and stored.trailing != (length,):
        raise CaptureError(
            f"this generate() call made sequences of {length} positions (a prompt of "
            f"{prompt_length} + max_new_tokens {length - prompt_length}), but the store holds "
            f"sequences of {stored.trailing[0]}: a store keeps one length. Use the same prompt "
            "length (tokenizer(..., padding='max_length', max_length=N)) and max_new_tokens "
            "for every call, or write each to a new store")


def _put(recorder: Recorder, site: str, kind: str, first: _Put, result: Assembled) -> None:
    attrs = {**first.attrs, "generated": True}
    if result.filled:
        attrs["filled"] = result.filled
    recorder.put(site, kind, result.values, first.roles, first.module_type, attrs=attrs)


def _by_variable(steps: list[_Step]) -> dict[tuple[str, str, int], list[tuple[_Step, _Put]]]:
    """Each (site, kind, call) across the steps, in the order first seen: a repeated call of a
    site within a step is its own variable, and the recorder numbers it the same way
    (``kind.call1``) when the calls are put in this order."""
    grouped: dict[tuple[str, str, int], list[tuple[_Step, _Put]]] = {}
    for step in steps:
        calls: dict[tuple[str, str], int] = {}
        for put in step.puts:
            index = calls.get((put.site, put.kind), 0)
            calls[(put.site, put.kind)] = index + 1
            grouped.setdefault((put.site, put.kind, index), []).append((step, put))
    return grouped
