"""PyTorch backend: forward hooks on ``torch.nn.Module`` trees (a site whose outputs alone
are taken: its hook run inside the module's ``forward`` where nothing else hooks it, see
``_torch_forward``).

Outputs (a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``) become one variable per
tensor; inputs on request; attention probabilities from attention modules, taken from their
returned weights (eager attention) or recomputed from the query and key handed to
``torch.nn.functional.scaled_dot_product_attention`` (fused attention returns no weights).
A ``torch.compile``d model is traced through the module it wraps, run eagerly while attached
(``_torch_compile``).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layerscope.core import CaptureError, Recorder, Selection, SiteInfo
from layerscope.core.direct import OutputHook, SitePut
from layerscope.core.naming import ROOT_SITE, hidden_size_of, move_batch_first
from layerscope.core.recorder import SCALAR
from layerscope.core.reduce import PassMasks
from layerscope.core.writerecords import Alloc

from . import _torch_cuda
from ._attention import (
    AttentionTap,
    is_attention_module,
    multihead_weights,
)
from ._structure import leaves, part_kind
from ._torch_accelerate import input_device
from ._torch_compile import eager_while_attached, uncompiled
from ._torch_dims import is_elementwise, roles_for
from ._torch_dtypes import stored_dtype, unstorable, widened
from ._torch_forward import ForwardHook, wrappable, wraps_forwards
from ._torch_generate import GenerateWrapper
from ._torch_moe import Routers
from ._torch_reduce import OPS
from ._torch_rnn import TimeMajorIds
from ._torch_seq2seq import Seq2Seq
from ._torch_vocab import is_logits, vocabulary_modules, with_vocabulary_last
from .base import Backend

_TENSOR, _STRIDED = torch.Tensor, torch.strided

# The host copy is made at hook time (safe against later in-place ops such as
# ReLU(inplace=True)): on CPU straight into the writer's reused buffers; CUDA tensors are
# copied into reused pinned memory on a side stream, and the writer thread waits for them, not
# the model (_torch_cuda). Meta tensors hold no values: refused, never stored.

META = ("on the meta device, which holds shapes but no values (weights never loaded, e.g. a "
        "model built under accelerate's init_empty_weights, or offloaded without accelerate's "
        "hooks); load the weights (accelerate.load_checkpoint_and_dispatch, or from_pretrained "
        "with a device_map) before tracing")


def snapshot(tensor: torch.Tensor, alloc: Alloc | None = None) -> Any:
    tensor = tensor.detach()
    if tensor.device.type == "cuda" and alloc is not None:
        return _torch_cuda.COPIES.copy(tensor)
    if tensor.device.type == "meta":
        raise CaptureError(f"a tensor of shape {tuple(tensor.shape)} is {META}")
    if tensor.device.type != "cpu":
        return tensor.to("cpu")  # waits for the device: only outside a trace, or not CUDA
    dtype = stored_dtype(tensor.dtype)
    if alloc is None or dtype is None:
        return tensor.clone(memory_format=torch.contiguous_format)
    host = alloc(tuple(tensor.shape), dtype)
    torch.from_numpy(host).copy_(tensor)  # widened exactly (bfloat16 -> float32)
    return host


def _on_device(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is copied off a CUDA device when captured (:mod:`._torch_cuda`)."""
    return tensor.is_cuda


def _refuse_meta(site: str, kind: str, tensor: torch.Tensor) -> None:
    if tensor.is_meta:
        raise CaptureError(f"{site}@{kind}: the captured tensor is {META}")


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, _torch_cuda.DeviceCopy):
        return _torch_cuda.host_array(value)
    wide = widened(value.dtype)
    return (value if wide is value.dtype else value.to(wide)).numpy()  # widened exactly


def _tensors(value: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, tensor) for every tensor in a possibly nested output."""
    return leaves(value, lambda item: isinstance(item, torch.Tensor))


def _site(path: str) -> str:
    return path or ROOT_SITE


class _Capture:
    """The hooks of one ``attach`` block and the state they share during a pass."""

    def __init__(self, model: nn.Module, selection: Selection, recorder: Recorder) -> None:
        self.model = model
        self.selection = selection
        self.recorder = recorder
        self.hidden_size = hidden_size_of(model)
        self.vocabulary = vocabulary_modules(model)  # lm heads: their last axis is no feature
        self.attention = AttentionTap()
        self.seq2seq = Seq2Seq(model)  # encoder/decoder sides, self/cross attention
        recorder.encoder_decoder = self.seq2seq.active
        self.seq2seq.on_decoder_ids = recorder.put_decoder_tokens
        self.routers = Routers(model)  # mixture-of-experts routers' (batch·token) rows
        self.handles: list[Any] = []
        self.masks = PassMasks(None)  # the pass's attention masks, for reductions
        # weak: holding the maps until the pass ends would keep torch from reusing their memory
        self._seen_attention: dict[int, weakref.ref[torch.Tensor]] = {}
        # channels-first and vocabulary roles given this pass, by tensor: a container or an
        # activation passing a convolution's map (or a head's logits) on keeps its roles
        self._channels_first: dict[int, tuple[weakref.ref[torch.Tensor], tuple[str, ...]]] = {}
        #: site -> (dtype, stored dtype, same bytes, on a CUDA device) of a lone output tensor
        #: an earlier pass stored with no side effect on later sites (see _put_direct): the
        #: next may go straight to the writer (Recorder.direct_site), none of the labeling
        #: run again
        self._direct: dict[str, tuple[torch.dtype, np.dtype, bool, bool]] = {}
        self._site_puts: dict[str, SitePut] = {}  # the recorder's direct_site, per site

    # -- passes ------------------------------------------------------------------------------

    def begin(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.recorder.in_pass:
            self.recorder.abort_pass()  # the previous forward raised before it returned
        batch, token_ids = _batch_of(args, kwargs, _batch_axis(module))
        if batch is None:
            return
        self.attention.reset()
        self._seen_attention.clear()
        self._channels_first.clear()
        ids = _root_values(token_ids, "input ids") if token_ids is not None else None
        ids, decoder_ids = self.seq2seq.begin(args, kwargs, ids)
        self.routers.begin(batch)
        self.masks = PassMasks(batch, _tensor(kwargs.get("attention_mask")),
                               _tensor(kwargs.get("decoder_attention_mask")))
        self.recorder.begin_pass(batch, ids, decoder_ids,
                                 attention_mask=_mask(kwargs.get("attention_mask")),
                                 decoder_attention_mask=_mask(
                                     kwargs.get("decoder_attention_mask")))

    def end(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.recorder.in_pass:
            self.recorder.end_pass()
        self._seen_attention.clear()
        self._channels_first.clear()
        self.seq2seq.end()

    # -- sites -------------------------------------------------------------------------------

    def put(self, site: str, kind: str, module: nn.Module, tensor: torch.Tensor,
            source: Any = None) -> None:
        """``source``: the first input of the call whose output ``tensor`` is."""
        _refuse_meta(site, kind, tensor)
        if tensor.dim() == 0:
            self.recorder.skip(site, kind, SCALAR)
            return
        if tensor.layout is not torch.strided:
            self.recorder.skip(site, kind, f"a {str(tensor.layout).removeprefix('torch.')} "
                               "tensor; make it dense (to_dense()) in the model to capture it")
            return
        rows = self.routers.unflatten(module, kind, tensor, source)
        if rows is not None:  # a router's (batch·token, ...) rows, back on (batch, token)
            self._store(site, kind, *rows, module)
            return
        inherited = self._inherited(tensor)
        if inherited is None and isinstance(source, torch.Tensor) and is_elementwise(module) \
                and source.shape == tensor.shape:
            inherited = self._inherited(source)
        roles = roles_for(module, kind, tensor, self.hidden_size, inherited)
        vocabulary = inherited is None and kind != "attention" and (
            is_logits(kind) or (id(module) in self.vocabulary and kind.startswith("output")))
        if vocabulary:
            roles = with_vocabulary_last(roles)
        if ("channel" in roles or vocabulary) and kind != "attention":
            self._channels_first[id(tensor)] = (weakref.ref(tensor), roles)
        roles, attrs = self.seq2seq.label(site, kind, module, tensor, source, roles)
        moved, roles = move_batch_first(tensor, roles, torch.permute)
        self._store(site, kind, moved, roles, module, attrs)
        if kind == "output" and moved is tensor and inherited is None and not vocabulary \
                and "channel" not in roles and not attrs and not self.seq2seq.active \
                and (tensor.is_cpu or _on_device(tensor)):
            self._remember_direct(site, tensor)

    def _remember_direct(self, site: str, tensor: torch.Tensor) -> None:
        dtype = stored_dtype(tensor.dtype)
        if dtype is not None:  # put() lets strided tensors alone this far
            # bfloat16 is stored as float32; complex tensors may be conjugate views
            same_bytes = tensor.element_size() == dtype.itemsize and not tensor.is_complex()
            self._direct[site] = (tensor.dtype, dtype, same_bytes, _on_device(tensor))

    def _put_direct(self, site: str, output: Any, by_address: list[Any] | None = None,
                    raw_refused: bool = False) -> bool:
        """Store ``output`` the way :meth:`put` stored this site's last time, where that
        changed no state a later site reads (its roles, channels, sides): straight into the
        writer, if it takes it so (a tensor of the variable's stored shape, or shorter along
        token axes: copied into its gathered chunk, or into pool memory and queued; see
        core/direct.py; a CUDA tensor's copy off the device queued, see _torch_cuda). On a
        GPU whose forward is bound by the host's kernel launches, the labeling this skips
        is a third of a hook's cost. Called for every captured module: the cheapest checks
        (``is_cpu``, not ``device.type``) and no attention lookup where none was stored.
        ``by_address`` (the hook's) is given the site's way by address once it took one;
        ``raw_refused``: the hook already offered this tensor that way, in vain."""
        known = self._direct.get(site)
        if known is None or type(output) is not _TENSOR or output.dtype is not known[0] \
                or output.layout is not _STRIDED or not (known[3] or output.is_cpu):
            return False
        if self._seen_attention:
            seen = self._seen_attention.get(id(output))
            if seen is not None and seen() is output:
                return False
        site_put = self._site_puts.get(site)
        if site_put is None or site_put.recorder is not self.recorder:
            if not isinstance(self.recorder, Recorder):  # generate() collects its steps
                return False
            site_put = self.recorder.direct_site(site, "output")
            if site_put is None:
                return False
            self._site_puts[site] = site_put
        if known[3]:  # on a CUDA device: its copy off it is queued, the writer waits for it
            if not _on_device(output):
                return False
            source = output.detach() if output.requires_grad else output
            return site_put.put_held(tuple(output.shape),
                                     lambda: _torch_cuda.COPIES.copy(source), to_numpy)
        if not raw_refused and site_put.by_address is not None and known[2] \
                and output.is_contiguous() and not output.is_neg():
            address = output.data_ptr()  # the same bytes, in order (0: no memory, empty)
            if address and site_put.put_raw(output.shape, known[1], address):
                if by_address is not None:
                    by_address[0] = (site_put, known[0], known[1])
                return True
        shape = tuple(output.shape)
        source = output.detach() if output.requires_grad else output

        def copy(memory: np.ndarray) -> None:
            torch.from_numpy(memory).copy_(source)

        return site_put.put(shape, known[1], copy)

    def _store(self, site: str, kind: str, tensor: torch.Tensor, roles: tuple[str, ...],
               module: nn.Module, attrs: Any = None) -> None:
        """Put ``tensor``, or the reductions of it the selection asks for, computed here on
        its device (only they are copied off it)."""
        recorder = self.recorder
        if stored_dtype(tensor.dtype) is None:
            recorder.skip(site, kind, unstorable(tensor.dtype))
            return
        if not isinstance(recorder, Recorder):  # generate() collects its steps
            if self.selection.reduces:
                raise CaptureError("positions= and reduce= do not apply to a traced generate(); "
                                   "trace the generated sequences with one forward pass instead")
            recorder.put(site, kind, tensor, roles, type(module).__name__, to_numpy, snapshot,
                         attrs)
            return
        for piece in recorder.reduce(site, kind, tensor, roles, OPS, self.masks):
            recorder.put(site, piece.kind, piece.value, piece.roles, type(module).__name__,
                         to_numpy, snapshot, {**(attrs or {}), **piece.attrs})

    def _inherited(self, tensor: torch.Tensor) -> tuple[str, ...] | None:
        known = self._channels_first.get(id(tensor))
        return known[1] if known is not None and known[0]() is tensor else None

    def inputs(self, site: str, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> None:
        if not self.recorder.in_pass:
            return
        for path, tensor in _tensors((args, kwargs)):  # path: (0, position) or (1, keyword)
            self.put(site, part_kind("input", path[1:]), module, tensor)

    def outputs(self, site: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                output: Any, attention: bool, keep_outputs: bool) -> None:
        if not self.recorder.in_pass:
            return
        probabilities = self.attention.pop(module) if attention else None
        taken = probabilities.recomputed if probabilities is not None else None
        if attention and taken is None and isinstance(module, nn.MultiheadAttention):
            returned = output[1] if isinstance(output, tuple) else None
            taken = returned if returned is not None and returned.dim() == 4 else \
                multihead_weights(module, args, kwargs)
        source = next((t for _, t in _tensors((args, kwargs))), None) if keep_outputs else None
        for path, tensor in _tensors(output):
            seen = self._seen_attention.get(id(tensor))
            if seen is not None and seen() is tensor:
                continue  # an outer module handing back attention weights already stored
            if probabilities is not None and taken is None and path and path != ("0",) \
                    and probabilities.produced(tensor):
                taken = tensor  # the module's own softmax, not a tensor of that shape
                continue
            if keep_outputs:
                self.put(site, part_kind("output", path), module, tensor, source)
        if taken is not None:
            self._seen_attention[id(taken)] = weakref.ref(taken)
            self.put(site, "attention", module, taken)

    def install(self) -> None:
        model, selection = self.model, self.selection
        self.handles.append(model.register_forward_pre_hook(self.begin, with_kwargs=True))
        self.handles.extend(TimeMajorIds().install(model))  # (token, batch) ids: refused
        mapped = set()  # the attention modules whose maps are stored
        wrapping = wraps_forwards(model)
        for path, module in model.named_modules():
            site = _site(path)
            if not selection.matches(site):
                continue
            attention = selection.wants("attention", site) and is_attention_module(module)
            if attention:
                mapped.add(module)
                self.handles.append(module.register_forward_pre_hook(
                    self.attention.enter, with_kwargs=True))
            if selection.wants("input", site):
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, s=site: self.inputs(s, m, a, k), with_kwargs=True))
            keep_outputs = selection.wants("output", site)  # decided once, not per call
            if attention:
                self.handles.append(module.register_forward_hook(
                    lambda m, a, k, o, s=site, att=attention, out=keep_outputs:
                    self.outputs(s, m, a, k, o, att, out), with_kwargs=True))
            elif keep_outputs:
                hook = self._output_hook(site)
                self.handles.append(
                    ForwardHook(module, hook) if wrapping and wrappable(module, model)
                    else module.register_forward_hook(hook, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self.end, with_kwargs=True))
        self.handles.extend(self.seq2seq.install(model, mapped))  # after the hooks above
        self.handles.extend(self.routers.install())

    def _output_hook(self, site: str) -> Callable[..., None]:
        """The hook of a site whose outputs alone are taken, the usual site of a model
        traced at every module: its direct way first (one call less for each of thousands
        a batch). Once an output went by address (:meth:`_put_direct` leaves its SitePut and
        dtypes in ``by_address``), the next is tried so first, the same checks made inline and
        nothing looked up by site: about 2 us a hook less, inside a forward of 1,601 sites. A
        hook returns None: anything else would replace the module's output. Where the C part
        is built, the hook torch calls is :data:`.direct.OutputHook`, which takes that first
        case itself (the same checks, claim and copy) and calls this one for the rest. Torch
        calls it as a forward hook, or the module's wrapped ``forward`` does
        (``_torch_forward.ForwardHook``)."""
        by_address: list[Any] = [None]  # (SitePut, dtype, stored dtype)

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            known, refused = by_address[0], False
            if known is not None and type(output) is _TENSOR and output.dtype is known[1] \
                    and output.is_cpu and output.layout is _STRIDED \
                    and not self._seen_attention and known[0].recorder is self.recorder \
                    and output.is_contiguous() and not output.is_neg():
                address = output.data_ptr()
                if address and known[0].put_raw(output.shape, known[2], address):
                    return
                refused = bool(address)
            if not self._put_direct(site, output, by_address, refused):
                self.outputs(site, module, args, kwargs, output, False, True)
        if OutputHook is not None:  # the same hook, its common case in C (core/_directc.c)
            return OutputHook(hook, self, by_address, _TENSOR, _STRIDED)  # type: ignore[no-any-return]
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.recorder.in_pass:
            self.recorder.abort_pass()


def _batch_axis(model: nn.Module) -> int:
    """Where the batch is in the root's first input: time-major RNNs put it second."""
    return 1 if isinstance(model, nn.RNNBase) and not model.batch_first else 0


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any],
              axis: int = 0) -> tuple[int | None, Any]:
    """Batch size and token ids of a root forward call."""
    token_ids = kwargs.get("input_ids")
    first = None
    for _, tensor in _tensors((args, kwargs)):
        if tensor.dim() >= 1:
            first = tensor
            break
    if token_ids is None and first is not None and first.dim() == 2 and not first.is_floating_point():
        token_ids = first
    if token_ids is not None:
        return int(token_ids.shape[0]), token_ids
    if first is None or first.dim() <= axis:
        return None, None
    return int(first.shape[axis]), None


class TorchBackend:
    name = "torch"
    extra = "torch"

    def can_handle(self, model: Any) -> bool:
        module = sys.modules.get("torch.nn")
        if module is None or not isinstance(model, module.Module):
            return False
        # on Keras's PyTorch backend a Keras model is a torch Module too: it is Keras's
        keras_layer = getattr(sys.modules.get("keras.layers"), "Layer", None)
        return keras_layer is None or not isinstance(model, keras_layer)

    def sites(self, model: nn.Module) -> list[SiteInfo]:
        return [
            SiteInfo(_site(path), type(module).__name__, is_attention_module(module))
            for path, module in uncompiled(model).named_modules()
        ]

    @contextmanager
    def attach(self, model: nn.Module, selection: Selection, recorder: Recorder) -> Iterator[None]:
        eager = eager_while_attached(model)  # a compiled model: hooks on its module, run eagerly
        capture = _Capture(uncompiled(model), selection, recorder)
        generate = GenerateWrapper(uncompiled(model), capture)  # one sequence, one sample
        try:
            capture.install()
            with eager, capture.attention.patched(selection.wants("attention")), \
                    generate.installed(), _torch_cuda.COPIES.pool.in_use():
                yield
        finally:
            capture.remove()

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return to_numpy(snapshot(tensor) if isinstance(tensor, torch.Tensor) else tensor)

    def framework_version(self) -> str:
        return str(torch.__version__)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        model = uncompiled(model)
        config = getattr(model, "config", None)
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        described: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
        if name:  # a local folder: keep the last two parts, not this machine's layout
            described["name"] = "/".join(str(name).rstrip("/").split("/")[-2:])
        return described

    def run(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        device = input_device(model)

        def convert(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                tensor = torch.from_numpy(value)
                if not tensor.is_floating_point():
                    tensor = tensor.long()
                return tensor.to(device)
            return value

        with torch.no_grad():
            return model(*(convert(a) for a in args), **{k: convert(v) for k, v in kwargs.items()})

    def load_folder(self, folder: Path, attn_implementation: str | None = None
                    ) -> tuple[Any, Any]:
        """A Hugging Face folder as the class its ``config.json`` names (head included, see
        :func:`layerscope._hf_architectures.read_architecture`), with its ``AutoTokenizer``."""
        from transformers import AutoTokenizer
        from transformers.utils import logging

        from layerscope._hf_architectures import read_architecture

        logging.disable_progress_bar()  # one progress bar (over batches) is enough
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model_class = read_architecture(folder).model_class()
        model = model_class.from_pretrained(str(folder), **kwargs).eval()
        return model, AutoTokenizer.from_pretrained(str(folder))


BACKEND: Backend = TorchBackend()


def _tensor(value: Any) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def _mask(value: Any) -> Any:
    """An attention mask the root call was given, as NumPy (the recorder checks its shape)."""
    return _root_values(value, "attention mask") if isinstance(value, torch.Tensor) else None


def _root_values(tensor: torch.Tensor, what: str) -> np.ndarray:
    if tensor.is_meta:
        raise CaptureError(f"the model was called with {what} {META}")
    return tensor.detach().cpu().numpy()
