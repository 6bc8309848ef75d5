"""Encoder-decoder models in PyTorch: which stack's positions each tensor indexes, and whether
an attention call is self- or cross-attention.

The format names the decoder's positions ``decoder_token`` / ``decoder_query`` /
``decoder_key`` and keeps ``token`` / ``query`` / ``key`` for the encoder's. Which side a
tensor is on is decided by where it came from, never by its length (a source and a target of
the same length look alike):

- by identity during the pass: the root's inputs (``input_ids``, ``input_features``, ... are
  the encoder's; ``decoder_input_ids``, ``labels``, ... the decoder's), everything the encoder
  stack returns, the ``encoder_hidden_states`` handed to the decoder stack and the
  ``key_value_states`` handed to a cross-attention are the encoder's; the output of a linear
  layer, an embedding, a layer norm or an activation whose input is known is on its input's
  side (a cross-attention's key and value projections index the encoder's positions);
- otherwise by the stack the module sits in (``stack_of`` of its path);
- outside both stacks: the model's output embeddings (its LM head) map the decoder's states,
  and the parts of a Hugging Face seq2seq output say whose they are (``encoder_*`` or
  ``logits``, ``decoder_*``, ``last_hidden_state``).

A tensor made inside a cross-attention call from something no rule recognises (the output
projection, fed by the attention's weighted sum) gets neutral names for its token axes: a
wrong side is worse than none.

Self or cross is what the attention module was handed: a ``key_value_states`` /
``encoder_hidden_states`` argument that is not None (or ``nn.MultiheadAttention`` keys that
are not its queries) is cross-attention; a module whose only sequence input is its queries is
self-attention; anything else is left unsaid.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, TypeGuard

import torch
from torch import nn

from layerscope.core.naming import DECODER_PREFIX, STACKS, default_roles, stack_of

from ._attention import is_attention_module
from ._torch_dims import is_elementwise, is_linear

ENCODER, DECODER = STACKS
SELF, CROSS = "self", "cross"
_TOKEN_ROLES = ("token", "query", "key")

#: arguments of an attention call that carry the sequence attended to in cross-attention
_CROSS_ARGUMENTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")
#: arguments of an attention call that hold no second sequence (masks, positions, caches)
_NOT_A_SEQUENCE = frozenset((
    "attention_mask", "mask", "attn_mask", "key_padding_mask", "causal_mask",
    "encoder_attention_mask", "head_mask", "layer_head_mask", "position_embeddings",
    "position_ids", "position_bias", "cache_position", "rotary_pos_emb", "alibi",
    "past_key_value", "past_key_values", "cache", "layer_past", "output_attentions",
    "use_cache", "kwargs", "args",
))
#: root arguments of a seq2seq forward, by the side whose positions they index
_ROOT_ARGUMENTS = {
    ENCODER: ("input_ids", "attention_mask", "inputs_embeds", "input_features",
              "input_values", "encoder_outputs", "src"),
    DECODER: ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds",
              "decoder_position_ids", "labels", "tgt"),
}
#: root arguments that are (batch, token) grids of ids or flags when they are 2-d integers
_TOKEN_GRIDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "labels")
#: parts of a Hugging Face seq2seq output whose first name says the side
_OUTPUT_PARTS = {
    "encoder_last_hidden_state": ENCODER, "encoder_hidden_states": ENCODER,
    "encoder_attentions": ENCODER, "logits": DECODER, "last_hidden_state": DECODER,
    "decoder_hidden_states": DECODER, "decoder_attentions": DECODER,
    "cross_attentions": DECODER,
}


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a possibly nested value (tuples, lists, dicts, dataclasses)."""
    from ._structure import leaves

    for _, tensor in leaves(value, lambda item: isinstance(item, torch.Tensor)):
        yield tensor


@functools.cache
def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def bound_arguments(function: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``args`` and ``kwargs`` of a call of ``function`` by parameter name (``**kwargs``
    flattened); None where they do not bind."""
    signature = _signature(function)
    if signature is None:
        return None
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return None
    named: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def _forward_of(module: nn.Module) -> Callable[..., Any]:
    return type(module).forward  # unbound: bound with the module as ``self``


def attention_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[str | None, torch.Tensor | None, torch.Tensor | None]:
    """``(kind, queries, attended)`` of one attention call: ``kind`` ``self``, ``cross`` or
    None (cannot tell); ``queries`` the query-side input, ``attended`` the key/value input of a
    cross-attention."""
    if isinstance(module, nn.MultiheadAttention):
        given = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
        query, key = given.get("query"), given.get("key")
        if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
            return None, None, None
        return (SELF, query, None) if key is query else (CROSS, query, key)
    bound = bound_arguments(_forward_of(module), (module, *args), kwargs)
    if bound is None:
        return None, None, None
    bound.pop(next(iter(bound)), None)  # self
    if not bound:
        return None, None, None
    first = next(iter(bound))
    query = bound.pop(first)
    if not isinstance(query, torch.Tensor):
        return None, None, None
    for name in _CROSS_ARGUMENTS:
        attended = bound.get(name)
        if isinstance(attended, torch.Tensor):
            return CROSS, query, attended
    for name, value in bound.items():
        if name not in _NOT_A_SEQUENCE and name not in _CROSS_ARGUMENTS \
                and any(True for _ in _tensors(value)):
            return None, query, None  # a second input we cannot place
    return SELF, query, None


def is_encoder_decoder(model: nn.Module) -> bool:
    """A Hugging Face ``config.is_encoder_decoder`` model, or one with an ``encoder`` and a
    ``decoder`` stack that both hold attention (a word language model whose embedding is
    called ``encoder`` and whose output layer ``decoder`` is not one)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) is True:
        return True
    with_attention = {stack for root, stack in _stack_modules(model)
                      if any(is_attention_module(m) for m in root.modules())}
    return with_attention == set(STACKS)


def _stack_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each stack's top module (``model.encoder``, ``decoder``) and its stack."""
    found = []
    for path, module in model.named_modules():
        segments = path.split(".")
        if segments[-1].lower() in STACKS and stack_of(".".join(segments[:-1])) is None:
            found.append((module, segments[-1].lower()))
    return found


def stack_roots(model: nn.Module) -> dict[int, str]:
    """``id`` of each stack's top module (``model.encoder``, ``decoder``) -> its stack."""
    return {id(module): stack for module, stack in _stack_modules(model)}




def side_roles(roles: tuple[str, ...], sides: Iterable[str | None]) -> tuple[str, ...]:
    """``roles`` with each token axis named for its side: the decoder's prefixed, the
    encoder's plain, an unknown side's neutral (``axis<i>``)."""
    # never "batch" for a first axis whose side is unknown (a time-major tensor): the batch
    # axis is named once
    neutral = ("axis0", *default_roles(len(roles))[1:])
    side_of_axis = iter(sides)
    named = []
    for i, role in enumerate(roles):
        if role not in _TOKEN_ROLES:
            named.append(role)
            continue
        side = next(side_of_axis, None)
        if side == DECODER:
            named.append(DECODER_PREFIX + role)
        elif side == ENCODER:
            named.append(role)
        else:
            named.append(neutral[i])
    return tuple(named)


class Seq2Seq:
    """Side and attention bookkeeping for one ``attach`` block of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active = is_encoder_decoder(model)
        self._stacks = stack_roots(model) if self.active else {}
        self._sites = {id(m): path for path, m in model.named_modules()}
        head = getattr(model, "get_output_embeddings", None)
        try:
            self._head = head() if callable(head) else None
        except (AttributeError, NotImplementedError):
            self._head = None
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        # per attention module: (kind, query side, key side) of its latest call
        self._calls: dict[int, tuple[str | None, str | None, str | None]] = {}
        self._cross_sites: list[str] = []  # cross-attention calls running now
        # called with the decoder's ids where the root call did not hold them
        self.on_decoder_ids: Callable[[Any], None] | None = None
        self._decoder_ids_known = False
        # the root's 2-d id and mask arguments: (batch, token), not (batch, feature)
        self._token_grids: dict[int, weakref.ref[torch.Tensor]] = {}

    # -- hooks -------------------------------------------------------------------------------

    def install(self, model: nn.Module, mapped: Collection[nn.Module]) -> list[Any]:
        """Hooks that follow the stacks and the attention calls; install them after the
        capture's own, so an attention call's record is still there when its map is put.
        Outside an encoder-decoder only the calls of ``mapped`` (the attention modules whose
        maps are stored) are followed: a call's record labels its map, nothing else."""
        handles = []
        for module in model.modules():
            if is_attention_module(module) and (self.active or module in mapped):
                handles.append(module.register_forward_pre_hook(self._attention_entered,
                                                                with_kwargs=True))
                handles.append(module.register_forward_hook(self._attention_left))
            side = self._stacks.get(id(module))
            if side is not None:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, s=side: self._stack_entered(m, a, k, s), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    lambda m, a, o, s=side: self._remember(_tensors(o), s)))
        return handles

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any],
              token_ids: Any) -> tuple[Any, Any]:
        """A pass starts: the encoder's and the decoder's token ids of the root call (the
        decoder's only where the call holds them, or the model builds them from ``labels``
        with its own method); ``token_ids`` unchanged for other models."""
        self.end()
        bound = bound_arguments(_forward_of(self.model), (self.model, *args), kwargs) or {}
        for name in _TOKEN_GRIDS:
            grid = bound.get(name)
            if _is_ids(grid):  # not copied to the host: on a GPU that waits for the device
                self._token_grids[id(grid)] = weakref.ref(grid)
        if not self.active:
            return token_ids, None
        for side, names in _ROOT_ARGUMENTS.items():
            for name in names:
                self._remember(_tensors(bound.get(name)), side)
        encoder_ids = _ids(bound.get("input_ids"))
        decoder_ids = _ids(bound.get("decoder_input_ids"))
        labels = bound.get("labels")
        build = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if decoder_ids is None and bound.get("decoder_inputs_embeds") is None \
                and _ids(labels) is not None and callable(build):
            try:
                with torch.no_grad():
                    decoder_ids = _ids(build(labels=labels))
            except Exception:  # noqa: BLE001 - the forward meets the same error and raises it
                decoder_ids = None
        self._decoder_ids_known = decoder_ids is not None
        return encoder_ids, decoder_ids

    def end(self) -> None:
        self._known.clear()
        self._calls.clear()
        self._cross_sites.clear()
        self._token_grids.clear()

    def _stack_entered(self, module: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any], side: str) -> None:
        if side != DECODER:
            return
        bound = bound_arguments(_forward_of(module), (module, *args), kwargs) or {}
        self._remember(_tensors(bound.get("encoder_hidden_states")), ENCODER)
        ids = _ids(bound.get("input_ids"))
        if not self._decoder_ids_known and ids is not None and self.on_decoder_ids is not None:
            # ids the model built itself (BART from input_ids, Whisper from labels): what
            # the decoder reads labels its positions
            self._decoder_ids_known = True
            self.on_decoder_ids(ids)

    def _attention_entered(self, module: nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> None:
        kind, query, attended = attention_call(module, args, kwargs)
        site = self._sites.get(id(module), "")
        query_side = self._side_by_identity(query) or self._stack_side(site)
        key_side = query_side if kind == SELF else self._side_by_identity(attended)
        if kind == CROSS and key_side is None and self._stack_side(site) == DECODER \
                and self.active:
            key_side = ENCODER  # what a decoder's cross-attention attends to, by design
        self._calls[id(module)] = (kind, query_side, key_side if kind is not None else None)
        if not self.active:
            return
        self._remember((query,) if query is not None else (), query_side)
        self._remember((attended,) if attended is not None else (), key_side)
        if kind == CROSS:
            self._cross_sites.append(site)

    def _attention_left(self, module: nn.Module, args: Any, output: Any) -> None:
        site = self._sites.get(id(module), "")
        if self._cross_sites and self._cross_sites[-1] == site:
            self._cross_sites.pop()

    # -- labels ------------------------------------------------------------------------------

    def label(self, site: str, kind: str, module: nn.Module, tensor: torch.Tensor,
              source: Any, roles: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
        """``roles`` named for their sides, and the attributes of the variable (``attention``
        for an attention map)."""
        if kind == "attention":
            call_kind, query_side, key_side = self._calls.get(id(module), (None, None, None))
            attrs = {"attention": call_kind} if call_kind is not None else {}
            if not self.active:
                return roles, attrs
            return side_roles(roles, (query_side, key_side)), attrs
        grid = self._token_grids.get(id(tensor))
        if grid is not None and grid() is tensor and tensor.dim() == 2:
            roles = ("batch", "token")
        if not self.active:
            return roles, {}
        side = self.side(site, kind, module, tensor, source)
        self._remember((tensor,), side)
        return side_roles(roles, (side,) * len(roles)), {}

    def side(self, site: str, kind: str, module: nn.Module, tensor: torch.Tensor,
             source: Any) -> str | None:
        """``encoder``, ``decoder`` or None (cannot tell) for the positions of ``tensor``."""
        known = self._side_by_identity(tensor)
        if known is not None:
            return known
        if isinstance(source, torch.Tensor) and _keeps_positions(module):
            known = self._side_by_identity(source)
            if known is not None:
                return known
        if any(site.startswith(cross + ".") for cross in self._cross_sites):
            return None  # made inside a cross-attention from something we cannot place
        stack = self._stack_side(site)
        if stack is not None:
            return stack
        if module is self._head and kind.startswith("output"):
            return DECODER  # the LM head of an encoder-decoder model reads the decoder
        base, _, part = kind.partition(".")
        return _OUTPUT_PARTS.get(part.split(".", 1)[0]) if base == "output" else None

    def _stack_side(self, site: str) -> str | None:
        return stack_of(site) if self.active else None

    def _side_by_identity(self, tensor: Any) -> str | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        known = self._known.get(id(tensor))
        return known[1] if known is not None and known[0]() is tensor else None

    def _remember(self, tensors: Iterable[torch.Tensor], side: str | None) -> None:
        if side is None:
            return
        for tensor in tensors:
            if self._side_by_identity(tensor) is None:
                self._known[id(tensor)] = (weakref.ref(tensor), side)


def _keeps_positions(module: nn.Module) -> bool:
    """Modules whose output has their input's positions in place."""
    return is_linear(module) or is_elementwise(module) or isinstance(
        module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm))


def _is_ids(value: Any) -> TypeGuard[torch.Tensor]:
    """Whether ``value`` is a 2-d integer tensor, as token ids are."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()


def _ids(value: Any) -> Any:
    """A 2-d integer tensor of token ids as NumPy; None for anything else."""
    return value.detach().cpu().numpy() if _is_ids(value) else None
