"""The backend contract: what a framework adapter implements, what it may add, and what it gets.

A backend knows one framework and nothing about storage. It finds a model's capturable places
(*sites*), installs hooks on them for the length of a ``with`` block, and hands each captured
tensor, batch axis first, to core's :class:`~layerscope.core.Recorder`, which names, labels,
chunks and writes it. Everything a backend must provide is :class:`Backend`; the optional
extras are :class:`TokenizerAdapter` and :class:`FolderLoader`, looked up only through
:func:`tokenizer_adapter` and :func:`folder_loader`. ``BACKEND: Backend = MyBackend()`` in the
backend's module lets mypy check that it conforms; :mod:`layerscope.testing` checks that it
behaves (subclass its ``ConformanceSuite`` with a kit of tiny models).

Registration
    Built-ins are listed in ``layerscope.backends.BUILTIN`` and loaded only when their framework
    is already imported. A third party declares an entry point in the group
    ``layerscope.backends`` whose name is the backend's :attr:`Backend.name` and whose object
    is the backend instance::

        [project.entry-points."layerscope.backends"]
        mlx = "layerscope_mlx:BACKEND"

    ``detect()`` loads every installed plugin that is not a built-in when no built-in claims a
    model, so a plugin module must import cheaply: import the framework inside the methods that
    need it, not at the top (``can_handle`` is called before anything else and looks at
    ``sys.modules`` only).

One capture, in order (all on the thread that runs the model unless said otherwise)
    1. ``can_handle(model)`` picks the backend (``detect``), or confirms a named one.
    2. ``framework_version()`` and ``describe(model)`` go into the store's group attributes.
    3. ``attach(model, selection, recorder)`` is entered: hooks are installed.
    4. For each forward pass of the model (called by the user, or by ``run`` for
       ``layerscope.capture``), the hooks call, in this order:

       - ``recorder.begin_pass(batch_size, token_ids=None, decoder_token_ids=None)`` when the
         top-level call starts: ``batch_size`` is the number of samples; ``token_ids`` a NumPy
         ``(batch, token)`` integer array where the input is token ids (it becomes the
         ``token_id`` coordinate); ``decoder_token_ids`` the decoder's input ids of an
         encoder-decoder model (``decoder_token_id`` on the ``decoder_token`` axis);
         ``attention_mask=`` the ids' padding mask where the call has one (``token_mask``).
         If ``recorder.in_pass`` is still true (a pass whose forward raised where the backend
         could not see it), call ``recorder.abort_pass()`` first.
       - ``recorder.put(site, kind, tensor, roles, module_type, to_numpy, snapshot, attrs)``
         for each captured tensor (``attrs``: more variable attributes, e.g.
         ``{"attention": "self"}`` or ``"cross"`` on an attention map), any number of
         times, in execution order (see *Tensors* below).
         The ``selection`` handed to ``attach`` (also ``recorder.selection``) says whether a
         kind is taken at a site, ``selection.wants(kind, site)``, and
         ``selection.matches(site)`` decides which sites get hooks at all.
       - ``recorder.end_pass()`` when the top-level call returns: the batch is complete and
         will be committed once written.
       - or ``recorder.abort_pass()`` when the forward raised (any ``BaseException``, also
         ``KeyboardInterrupt``): the batch is discarded, the batches before it stay committed.
         Re-raise the error afterwards; never swallow it.

       ``put`` outside a pass is ignored, so hooks that fire for the backend's own calls are
       harmless.
    5. ``attach`` exits, normally or through an exception or ``KeyboardInterrupt``: every hook
       and wrapper is removed, the model is left exactly as it was, and a pass still open is
       aborted (``if recorder.in_pass: recorder.abort_pass()``) in a ``finally``. Then the
       trace closes the recorder and the store ends ``complete`` or ``aborted``.

Tensors
    - The first axis of what ``put`` receives is the batch (``batch_size`` samples); move it
      there (:func:`layerscope.core.naming.move_batch_first`). ``roles`` names every axis
      from the format's vocabulary (``batch``, ``token``, ``hidden``, ``head``, ``query``,
      ``key``, ``neuron``, ``channel``, ``height``, ``width``, ...; README, The format); an axis the
      backend cannot name with confidence gets a neutral name (``axis<i>``,
      :func:`~layerscope.core.naming.default_roles`): a wrong known role is worse than none.
      :func:`~layerscope.core.naming.hidden_size_of` and
      :func:`~layerscope.core.naming.feature_role` tell ``hidden`` from ``neuron``.
    - Encoder-decoder models: the token, query and key axes of a tensor on the decoder's side
      are named ``decoder_token``, ``decoder_query``, ``decoder_key``
      (:func:`~layerscope.core.naming.decoder_side`); cross-attention is
      (``batch``, ``head``, ``decoder_query``, ``key``). Set ``recorder.encoder_decoder``
      in ``attach`` for such a model: the recorder then adds the ``stack`` attribute
      (``encoder`` / ``decoder``) from each site's path.
    - ``put`` returns at once: the tensor waits in the writer's queue while the model runs on.
      If the framework may change it in place later (an in-place ReLU, a reused buffer), pass
      ``snapshot``: ``snapshot(tensor, alloc)`` runs inside ``put``, on the model's thread, and
      must copy the values now. ``alloc(shape, dtype)`` gives one empty NumPy array in memory
      the writer owns and reuses; copying into it is the cheap path. A snapshot may instead
      return an object of its own (an asynchronous device-to-host copy), or be omitted for
      frameworks whose arrays never change (JAX).
    - Reductions (``positions=`` / ``reduce=``, :mod:`layerscope.core.reduce`): a backend
      that computes them on the device calls ``recorder.reduce(site, kind, tensor, roles,
      ops, masks)`` in its hook and puts each piece it returns (``piece.kind``,
      ``piece.value``, ``piece.roles``, ``piece.attrs`` merged into its own attrs). ``ops``
      implements :class:`~layerscope.core.reduce.ArrayOps` (seven array operations in the
      framework); ``masks`` is a :class:`~layerscope.core.reduce.PassMasks` of the pass's
      attention mask as the framework's tensor. A backend that never calls ``reduce`` hands
      whole tensors, and the recorder computes the reductions from the host copy in NumPy.
    - ``nbytes``: what waits in the queue (the tensor, or what ``snapshot`` returned) is
      counted against the writer's memory budget (``StoreOptions.max_pending_bytes``) by its
      ``nbytes`` attribute, which must be an ``int``: the bytes it holds in host memory until
      written (for a device tensor, the bytes its host copy will take). Without one the
      writer counts 4 bytes per element. Memory from ``alloc`` is counted by its buffer.
      ``put`` blocks while the budget is full, so a model never runs ahead of the disk.
    - ``to_numpy(held)`` turns what waits in the queue into a NumPy array. It runs on a writer
      thread, later, several at once for different tensors: it must be thread-safe, must not
      need the model's thread (no framework state bound to it), may block (waiting for a
      device copy), and must keep the dtype (bfloat16 and other ML floats widened to float32,
      exactly). It is handed to ``put`` with every tensor; ``Backend.to_numpy`` is the same
      conversion for a tensor the caller holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from layerscope.core import Recorder, Selection, SiteInfo


@runtime_checkable
class Backend(Protocol):
    """What every backend implements (see the module docstring for the order of calls)."""

    #: the name users pass as ``backend=``; for a plugin, also its entry point's name
    name: str
    #: what installs the framework: the pip extra (``pip install 'layerscope[<extra>]'``) for
    #: a built-in, the distribution name for a plugin; quoted in error messages
    extra: str

    def can_handle(self, model: Any) -> bool:
        """True for models of this framework. Looks at ``type(model)`` and ``sys.modules``
        only: never imports a framework to decide. Must be False for every other framework's
        models (all installed backends are asked)."""
        ...

    def sites(self, model: Any) -> list[SiteInfo]:
        """The capturable places of ``model`` in definition order: dotted paths (``root`` for
        the model itself), module type names, whether each is an attention module. These are
        the paths ``capture=`` patterns match and ``put`` uses as ``site``."""
        ...

    def attach(self, model: Any, selection: Selection,
               recorder: Recorder) -> AbstractContextManager[None]:
        """A context manager that installs hooks on the sites ``selection`` matches and, for
        every forward pass inside the block, calls the recorder (``begin_pass``, ``put``,
        ``end_pass``, or ``abort_pass`` when the forward raised). On exit, whatever ended the
        block, every hook is removed and an open pass aborted."""
        ...

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor`` as NumPy, dtype kept (bfloat16 widened to float32,
        exactly). Thread-safe: the same conversion runs on writer threads."""
        ...

    def framework_version(self) -> str:
        """The framework's version (and its companions', e.g. ``jax 0.5, flax 0.10``),
        stored in the trace's ``framework_version`` attribute."""
        ...

    def describe(self, model: Any) -> dict[str, Any]:
        """A JSON-able description of ``model`` for the ``model`` attribute: ``class`` (its
        qualified class name) and, where known, ``name`` (never an absolute local path)."""
        ...

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call ``model`` once in inference mode (no gradients), turning the NumPy arrays in
        ``args`` / ``kwargs`` into the framework's tensors (integer arrays stay integer). Used
        by ``layerscope.capture`` and ``Trace.__call__``; the hooks of ``attach`` see it as
        one forward pass."""
        ...


@runtime_checkable
class TokenizerAdapter(Protocol):
    """Optional: a backend whose framework has its own tokenizers (keras-hub)."""

    def adapt_tokenizer(self, tokenizer: Any, model: Any = None) -> Any:
        """``tokenizer`` turned into one ``layerscope.capture`` can call like a Hugging Face
        tokenizer (``tokenizer(texts, padding=..., truncation=..., max_length=...,
        return_tensors="np")`` returning ``input_ids`` and an attention mask, plus
        ``convert_ids_to_tokens``); any other tokenizer returned unchanged."""
        ...


@runtime_checkable
class FolderLoader(Protocol):
    """Optional: a backend that can load a Hugging Face model folder (``layerscope trace
    FOLDER --framework NAME``)."""

    def load_folder(self, folder: Path, attn_implementation: str | None = None
                    ) -> tuple[Any, Any]:
        """``(model, tokenizer)`` from a folder holding ``config.json``, the weights and the
        tokenizer files, loaded offline. ``attn_implementation`` (``eager``, ``sdpa``) is a
        request a backend without such a choice ignores."""
        ...


#: ``(tokenizer, model) -> tokenizer``, as :meth:`TokenizerAdapter.adapt_tokenizer`
AdaptTokenizer = Callable[[Any, Any], Any]
#: ``(folder, attn_implementation) -> (model, tokenizer)``, as :meth:`FolderLoader.load_folder`
LoadFolder = Callable[[Path, str | None], tuple[Any, Any]]


def tokenizer_adapter(backend: Backend) -> AdaptTokenizer:
    """``backend.adapt_tokenizer`` where the backend has one, else a function that returns
    the tokenizer it is given. The one place that looks the optional method up."""
    adapt: AdaptTokenizer | None = getattr(backend, "adapt_tokenizer", None)
    return adapt if adapt is not None else _unchanged


def _unchanged(tokenizer: Any, model: Any = None) -> Any:
    return tokenizer


def folder_loader(backend: Backend) -> LoadFolder | None:
    """``backend.load_folder`` where the backend has one, else None. The one place that looks
    the optional method up."""
    load: LoadFolder | None = getattr(backend, "load_folder", None)
    return load


def class_mro_modules(model: Any) -> Iterator[str]:
    """The top-level packages that defined ``model``'s class and its bases (``torch``,
    ``keras``, ``flax``), most derived first: what ``can_handle`` and ``detect`` look at."""
    for cls in type(model).__mro__:
        yield cls.__module__.split(".", 1)[0]
