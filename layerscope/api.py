"""The public Python API: ``trace`` (a context manager), ``capture`` (one call) and ``sites``."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

from layerscope.backends import Backend, detect, get_backend, tokenizer_adapter
from layerscope.core import (
    BackendError,
    CaptureError,
    LayerscopeError,
    Recorder,
    Selection,
    SiteInfo,
    StoreOptions,
    open_trace,
)
from layerscope.core.collector import older_objects_frozen
from layerscope.core.format import new_group_attrs
from layerscope.core.naming import ROOT_SITE
from layerscope.core.reduce_spec import spec_kind
from layerscope.core.store import open_group_for_writing
from layerscope.core.userwarn import warn_user
from layerscope.core.writer import TraceWriter

CaptureSpec: TypeAlias = str | Sequence[str] | Selection | None


def _backend_for(model: Any, backend: str | None) -> Backend:
    if backend is None:
        return detect(model)
    chosen = get_backend(backend)
    if not chosen.can_handle(model):
        raise BackendError(
            f"backend {backend!r} cannot handle a {type(model).__qualname__}; "
            "leave backend unset to detect it"
        )
    return chosen


def token_decoder(tokenizer: Any) -> Callable[[Sequence[int]], list[str]] | None:
    """A function from token ids to token strings, for HF, keras-hub or plain callables."""
    if tokenizer is None:
        return None
    for method in ("convert_ids_to_tokens", "id_to_token"):
        if hasattr(tokenizer, method):
            convert = getattr(tokenizer, method)
            if method == "id_to_token":
                return lambda ids: [str(convert(int(i))) for i in ids]
            return lambda ids: [str(t) for t in convert(list(ids))]
    if callable(tokenizer):
        return lambda ids: [str(t) for t in tokenizer(ids)]
    raise LayerscopeError(
        f"tokenizer of type {type(tokenizer).__qualname__} cannot turn ids into tokens; pass a "
        "Hugging Face or keras-hub tokenizer, or a function ids -> list of strings"
    )


class Trace:
    """A capture in progress: every forward pass of ``model`` inside the block appends a batch."""

    def __init__(self, model: Any, path: str | Path, selection: Selection, backend: Backend,
                 options: StoreOptions, tokenizer: Any = None) -> None:
        self.model = model
        self.path = path
        self.selection = selection
        self.backend = backend
        self.options = options
        self.tokenizer = tokenizer
        self.recorder: Recorder | None = None
        self._attached: Any = None
        #: what the trace undoes at its close (see core/collector.py)
        self._undo_at_close = ExitStack()
        #: warn at the close where nothing was captured (the estimate's probe says it itself)
        self._warn_if_empty = True

    def __enter__(self) -> Trace:
        with ExitStack() as opening:
            opening.enter_context(older_objects_frozen())
            attrs = new_group_attrs(
                self.backend.name, self.backend.framework_version(),
                self.backend.describe(self.model), self.selection.to_json(),
            )
            group, existing = open_group_for_writing(self.path, self.options.mode, attrs)
            writer = TraceWriter(group, self.options, int(existing.get("committed_samples", 0)),
                                 int(existing.get("committed_batches", 0)))
            self.recorder = Recorder(writer, self.selection, self.backend.name,
                                     token_decoder(self.tokenizer))
            attached = self.backend.attach(self.model, self.selection, self.recorder)
            try:
                attached.__enter__()
            except BaseException:
                self.recorder.close(failed=True)
                raise
            self._attached = attached
            self._undo_at_close = opening.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.recorder is not None
        try:
            self._attached.__exit__(exc_type, exc, tb)
        finally:
            with self._undo_at_close:
                self.recorder.close(failed=exc_type is not None)
        why = nothing_captured(self.recorder) if exc_type is None and self._warn_if_empty \
            else None
        if why is not None:
            warn_user(f"nothing was captured into {self.path}: {why}")

    def set_texts(self, texts: Sequence[str]) -> None:
        """Label the next forward pass with the strings it was made from (``input_text``)."""
        if self.recorder is None:
            raise LayerscopeError("set_texts is only valid inside the 'with trace(...)' block")
        self.recorder.set_texts(texts)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the traced model once on ``args`` (one pass). Models that cannot be hooked in
        place, such as plain JAX functions, are called this way: ``t(params, x)``."""
        if self.recorder is None:
            raise LayerscopeError("a trace can only be called inside its 'with' block")
        return self.backend.run(self.model, args, kwargs)


def nothing_captured(recorder: Recorder) -> str | None:
    """Why the passes ``recorder`` took stored no captured tensor, where every tensor the
    selection took was skipped (a token choice on a model without token axes, a broadcast
    tensor): the store holds labels alone. None where something was captured."""
    if not recorder.passes or recorder.captured or not recorder.skipped:
        return None
    name, why = next(iter(recorder.skipped.items()))
    return (f"in {recorder.passes} passes the tensors the selection took were skipped, e.g. "
            f"{name}: {why} (the store's 'skipped' attribute lists each with its reason); "
            "choose other sites, kinds, positions or reductions")


def trace(model: Any, path: str | Path, capture: CaptureSpec = None, *,
          kinds: Iterable[str] | None = None, backend: str | None = None,
          tokenizer: Any = None, mode: str | None = None,
          options: StoreOptions | None = None, positions: str | slice | None = None,
          reduce: str | Sequence[str] | None = None) -> Trace:
    """Capture ``model`` into the Zarr store at ``path`` while the ``with`` block runs.

    ``capture`` holds glob patterns on module paths (``"encoder.layer.*.attention*"``);
    ``kinds`` what to take at each site (default: outputs and attention probabilities).
    ``positions`` (``"last"``, ``"first"``, ``"mask"``, a slice) and ``reduce`` (``"mean"``,
    ``"norm"``, ``"topk(8)"``, or several) store only those tokens, or those reductions, of
    every kind a pattern names without steps of its own (``"layers.*@output:last"``); they
    are computed on the model's device before anything is copied (README, "Only the data you
    ask for").
    ``mode``: 'w-' new store only (default), 'w' overwrite, 'a' append (the schema must match);
    it overrides ``options.mode``.

    Raises :class:`CaptureError` before anything is written when a kind is not one of
    output, input, attention, or when a pattern matches none of ``sites(model)`` (checked
    where a backend lists every site before the model runs: not for plain JAX functions and
    Linen modules).
    """
    base = options or StoreOptions()
    if mode is not None and mode != base.mode:
        from dataclasses import replace

        base = replace(base, mode=mode)
    chosen = _backend_for(model, backend)
    selection = Selection.of(capture, kinds, positions=positions, reduce=reduce)
    _check_selection(selection, chosen, model)
    return Trace(model, path, selection, chosen, base, tokenizer)


#: the kinds a selection may take at a site; tuple and dict parts (``output.1``) follow them
SELECTABLE_KINDS = ("output", "input", "attention")


def _check_kinds(selection: Selection) -> None:
    """Refuse kinds nothing would capture: a trace of them would be empty. (Their reduction
    steps, ``output:last``, were checked when the selection was made.)"""
    asked = [spec_kind(spec) for spec in selection.specs()]
    for kind in asked:
        if kind in SELECTABLE_KINDS:
            continue
        base = kind.split(".", 1)[0]
        if base in SELECTABLE_KINDS:
            hint = (f"select {base!r}: each part of a tuple or dict is stored on its own "
                    f"({base}.1, {base}.<key>)")
        elif kind == "grad":
            hint = "no backend captures gradients yet; use output, input or attention"
        else:
            hint = f"use {', '.join(SELECTABLE_KINDS)}"
        raise CaptureError(f"cannot capture kind {kind!r}: {hint}")


def _check_selection(selection: Selection, backend: Backend, model: Any) -> None:
    """Refuse, before a store is created, a selection that would capture nothing.

    Kinds are always checked. Patterns are checked against ``backend.sites(model)`` when the
    backend can list all of the model's sites before it runs: every ``capture`` pattern must
    then match a site of ``backend.sites(model)`` that ``exclude`` leaves. JAX finds some sites
    only while the model runs (a plain function's named scopes, a Linen module's ``@compact``
    submodules), so there only NNX models are checked; so is no model of which a backend
    lists nothing but the root.
    """
    _check_kinds(selection)
    nnx = sys.modules.get("flax.nnx")
    if backend.name == "jax" and not (nnx is not None and isinstance(model, nnx.Module)):
        return
    listed = backend.sites(model)
    if not any(site.path != ROOT_SITE for site in listed):
        return
    kept = [site for site in listed if not any(
        fnmatch.fnmatchcase(site.path, p) for p in selection.exclude)]
    examples = ", ".join(site.path for site in listed[:6])
    more = f" (and {len(listed) - 6} more)" if len(listed) > 6 else ""
    where = f"the {type(model).__qualname__}'s sites: {examples}{more}"
    for pattern in selection.include or ("*",):
        glob = pattern.partition("@")[0]
        if not any(fnmatch.fnmatchcase(site.path, glob) for site in kept):
            excluded = " that exclude leaves" if selection.exclude else ""
            raise CaptureError(
                f"capture pattern {pattern!r} matches no site{excluded}; "
                f"layerscope.sites(model) lists {where}"
            )


def sites(model: Any, backend: str | None = None) -> list[SiteInfo]:
    """The capturable places of ``model`` (paths for ``capture=`` patterns)."""
    return _backend_for(model, backend).sites(model)


def _stored_token_length(path: str | Path) -> int | None:
    """The token length of a trace being appended to: shorter new texts are padded to it
    (tensors whose axes are not named as tokens, e.g. a position bias, keep one length);
    longer ones grow the store (core/growth.py), never cut."""
    import warnings

    if not Path(path).exists():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an unfinished store: the append says so
        return open_trace(path).sizes.get("token")


def capture(model: Any, inputs: Any, path: str | Path, capture: CaptureSpec = None, *,
            tokenizer: Any = None, batch_size: int = 8, max_length: int | None = None,
            progress: bool = False, **trace_kwargs: Any) -> Any:
    """Run ``model`` on ``inputs`` and write everything to ``path``; returns the lazy Dataset.

    ``inputs``: a list of strings (tokenized with ``tokenizer`` to one padded length, batches
    of ``batch_size``, truncated to ``max_length`` tokens), a dict of tensors (one
    ``model(**inputs)`` call), a tensor (one ``model(x)`` call) or a list / iterable of those
    (one call each).
    """
    from .batches import plan_calls

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LayerscopeError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(
            max_length, int) or max_length < 1):
        raise LayerscopeError(
            f"max_length must be a whole number of tokens >= 1 (or None), not {max_length!r}"
        )
    backend_name = trace_kwargs.pop("backend", None)
    backend = _backend_for(model, backend_name)
    if tokenizer is not None:
        tokenizer = tokenizer_adapter(backend)(tokenizer, model)  # e.g. keras-hub tokenizers
    mode = trace_kwargs.get("mode") or (trace_kwargs.get("options") or StoreOptions()).mode
    pad_to = _stored_token_length(path) if mode == "a" else None
    calls = plan_calls(inputs, tokenizer, batch_size, max_length, pad_to)
    with trace(model, path, capture, tokenizer=tokenizer, backend=backend.name,
               **trace_kwargs) as active:
        for call in calls.progress(progress):
            if call.texts is not None:
                active.set_texts(call.texts)
            backend.run(model, call.args, call.kwargs)
    if active.recorder is not None and active.recorder.passes == 0:
        raise CaptureError("no forward pass ran: inputs were empty")
    return open_trace(path)
