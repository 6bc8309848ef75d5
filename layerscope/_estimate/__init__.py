"""Know before you run: how many bytes a trace of N samples will take, and whether it fits.

The model runs once, on the first samples of the first batch a trace would run (tokenized and
padded as the trace would), through the real writer into a store in memory: that gives every
variable's shape, dtype, codecs and, where the writer compresses, what a sample takes
compressed. :mod:`.layout` scales that to N samples by the writer's chunk rule, and
:mod:`.result` sets it against the free disk where the store would go.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerscope.core import LayerscopeError, Selection, StoreOptions
from layerscope.core.userwarn import warn_user

from .layout import Batches
from .probe import PROBE_SAMPLES, call_batch_size, first_samples, run_probe
from .result import Estimate, VariableEstimate, build_estimate, refusal
from .state import model_state_kept

__all__ = ["Estimate", "VariableEstimate", "estimate", "estimate_generation", "refusal"]


def estimate(model: Any, inputs: Any, n_samples: int | None = None, capture: Any = None, *,
             path: str | Path = ".", tokenizer: Any = None, batch_size: int = 8,
             max_length: int | None = None, **trace_kwargs: Any) -> Estimate:
    """How many bytes ``layerscope.capture(model, inputs, path, capture, ...)`` would write
    for ``n_samples`` samples (default: as many as ``inputs`` holds), and the free disk.

    Takes what :func:`layerscope.capture` takes (``kinds``, ``positions``, ``reduce``,
    ``backend``, ``mode``, ``options`` among ``trace_kwargs``). The model runs once on the
    first two samples of the first batch (one where batches hold one sample); more samples
    than ``inputs`` holds are taken to be like those. Token axes have the probe's length:
    for a list of texts, the longest text's (every text is padded to it); for tensors, the
    first input's.
    Nothing is written to disk, and the model is left as it was found (see :mod:`.state`).
    ``inputs`` are read to plan the batches: a one-shot iterator is refused (pass a list).
    """
    from layerscope.api import _backend_for, _stored_token_length, nothing_captured, trace
    from layerscope.backends import tokenizer_adapter
    from layerscope.batches import TextPairs, is_texts, plan_calls

    _check_count("batch_size", batch_size)
    if max_length is not None:
        _check_count("max_length", max_length)
    backend = _backend_for(model, trace_kwargs.pop("backend", None))
    options: StoreOptions = trace_kwargs.pop("options", None) or StoreOptions()
    mode = trace_kwargs.pop("mode", None) or options.mode
    kinds = trace_kwargs.pop("kinds", None)
    positions = trace_kwargs.pop("positions", None)
    reduce = trace_kwargs.pop("reduce", None)
    if trace_kwargs:
        raise TypeError(f"estimate() got unexpected arguments: {', '.join(sorted(trace_kwargs))}")
    if tokenizer is not None:
        tokenizer = tokenizer_adapter(backend)(tokenizer, model)
    if isinstance(inputs, Iterator):
        raise LayerscopeError("estimate reads the inputs to plan the trace's batches, which "
                              "would use up a one-shot iterator: pass a list")
    pad_to = _stored_token_length(path) if mode == "a" else None
    calls = plan_calls(inputs, tokenizer, batch_size, max_length, pad_to).calls
    sizes = [call_batch_size(call) for call in calls]
    texts: Any = inputs.texts if isinstance(inputs, TextPairs) else (
        inputs if is_texts(inputs) else None)
    # more texts than given run in batches of batch_size; more tensors, in batches like theirs
    batches = _batches(n_samples, sizes, batch_size if texts is not None else sizes[0])
    count = min(PROBE_SAMPLES, batches.first)
    probe_call = first_samples(calls[0], sizes[0], count)
    selection = Selection.of(capture, kinds, positions=positions, reduce=reduce)

    empty: list[str] = []

    def write(store: Any, probe_options: StoreOptions) -> None:
        with model_state_kept(model), trace(model, store, selection, backend=backend.name,
                                            tokenizer=tokenizer, options=probe_options) as active:
            active._warn_if_empty = False  # its store is in memory: said below, of the path
            if probe_call.texts is not None:
                active.set_texts(probe_call.texts)
            backend.run(model, probe_call.args, probe_call.kwargs)
            why = nothing_captured(active.recorder) if active.recorder is not None else None
            if why is not None:
                empty.append(why)

    probe = run_probe(write, options, count)
    for why in empty:
        warn_user(f"a trace into {path} would capture nothing: {why}")
    note = _token_note(texts, max_length, pad_to, _probe_length(probe_call))
    if texts is not None and batches.samples > len(texts):
        note += f" (the other samples are taken to be texts like those {len(texts)})"
    return build_estimate(probe, batches, options, path, mode, note)


def estimate_generation(loaded: Any, texts: list[str], selection: Selection, *,
                        new_tokens: int, batch_size: int, max_length: int | None,
                        n_samples: int | None, path: str | Path, mode: str) -> Estimate:
    """The estimate of ``layerscope trace --generate``: the probe generates from the first
    prompts, padded (on the left, for decoder-only models) to the longest prompt's length,
    as the trace pads every prompt."""
    from layerscope._trace_generate import trace_generation

    tokenizer = loaded.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=max_length is not None,
                                               max_length=max_length)["input_ids"]]
    whole, rest = divmod(len(texts), batch_size)
    batches = _batches(n_samples, [batch_size] * whole + [rest] * bool(rest), batch_size)
    count = min(PROBE_SAMPLES, batches.first)

    def write(store: Any, probe_options: StoreOptions) -> None:
        with model_state_kept(loaded.model):
            trace_generation(loaded, texts[:count], store, selection, new_tokens=new_tokens,
                             batch_size=count, max_length=max_length,
                             mode=probe_options.mode, progress=False, pad_to=max(lengths))

    probe = run_probe(write, StoreOptions(mode=mode), count)
    note = (f"the longest of the {len(texts)} prompts given ({max(lengths)} tokens; every "
            f"prompt is padded to it) and {new_tokens} generated")
    return build_estimate(probe, batches, StoreOptions(mode=mode), path, mode, note)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayerscopeError(f"{name} must be a whole number >= 1, not {value!r}")


def _batches(n_samples: int | None, sizes: list[int], per_batch: int) -> Batches:
    """The batches of the trace: the inputs' own, or ``n_samples`` in batches of
    ``per_batch``."""
    if n_samples is not None:
        _check_count("n_samples", n_samples)
    if n_samples is None or n_samples == sum(sizes):
        return Batches.of(sizes)
    return Batches.uniform(n_samples, per_batch)


def _probe_length(call: Any) -> int | None:
    ids = call.kwargs.get("input_ids")
    shape = getattr(ids, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 2 else None


def _token_note(texts: Any, max_length: int | None, pad_to: int | None,
                probe_length: int | None) -> str:
    """Where the token axes' length comes from, for the person reading the estimate."""
    if texts is not None:
        note = f"the longest of the {len(texts)} texts given"
        if max_length is not None and probe_length == max_length:
            note += f", cut to max_length {max_length}"
        if pad_to is not None and probe_length == pad_to:
            note = f"the store's own length ({pad_to}), which no text given exceeds"
        return note + "; every text is padded to it"
    return ("the probe's (the first input's); inputs of another length change it, and a "
            "longer one grows the token axes of the whole store")
