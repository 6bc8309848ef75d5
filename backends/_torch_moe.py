"""Mixture-of-experts routers in PyTorch: their outputs back on (batch, token) axes.

A Hugging Face MoE block (Mixtral, Qwen2-MoE, ...) flattens its (batch, token, hidden) input to
(batch·token, hidden) rows before its router, so the router's logits are (batch·token, expert)
and its top-k weights and indices (batch·token, k): no leading batch axis, and the recorder
would skip them (or, with one token per sample, store the rows as if they were the batch and
the experts as features). A router is known by what it declares, ``num_experts`` and
``top_k`` beside a (num_experts, hidden) weight; its rows are put back as (batch, token) only
where they are, by memory, the row-major flattening of a (batch, token, hidden) input: the
router's own input, or its parent module's input viewed as rows. The experts' axis is
``expert``; the top-k axis stays neutral. The experts beside the router (transformers fuses
them into one module: no expert's own output exists as a tensor) return their weighted mix
one row per token: put back as (batch, token, hidden) by the same rule.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from layerscope.core.naming import default_roles

EXPERT = "expert"


def is_router(module: nn.Module) -> bool:
    experts, top_k = getattr(module, "num_experts", None), getattr(module, "top_k", None)
    weight = getattr(module, "weight", None)
    return (isinstance(experts, int) and isinstance(top_k, int) and experts != top_k
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and int(weight.shape[0]) == experts)


class Routers:
    """Which router outputs of this pass are (batch·token, ...) rows, and of what shape."""

    def __init__(self, model: nn.Module) -> None:
        parents = {}
        for module in model.modules():
            for child in module.children():
                if is_router(child):
                    parents[id(child)] = module
        self._parents = parents
        # the router's siblings (the experts): id -> the MoE block they sit in
        self._siblings = {id(child): parent for parent in parents.values()
                          for child in parent.children() if not is_router(child)}
        # parent -> its running call's (batch, token, hidden) input, described (not held: the
        # router runs inside that call, while the input is alive)
        self._inputs: dict[int, _Grid] = {}
        # router outputs already unflattened this pass, by tensor (the model hands them on)
        self._rows: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, int], str]] = {}
        self._batch: int | None = None

    def install(self) -> list[Any]:
        handles = []
        for parent in {id(p): p for p in self._parents.values()}.values():
            handles.append(parent.register_forward_pre_hook(self._parent_entered))
        return handles

    def begin(self, batch: int) -> None:
        self._batch = batch
        self._inputs.clear()
        self._rows.clear()

    def _parent_entered(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dim() == 3:
            self._inputs[id(module)] = _Grid(first.data_ptr(), tuple(first.shape), first.dtype,
                                             first.is_contiguous())

    def unflatten(self, module: nn.Module, kind: str, tensor: torch.Tensor, source: Any
                  ) -> tuple[torch.Tensor, tuple[str, ...]] | None:
        """``tensor`` as (batch, token, ...) with its roles, where it is a router's rows (or
        one handed on); None for anything else."""
        known = self._rows.get(id(tensor))
        if known is not None and known[0]() is tensor:
            return self._reshaped(tensor, known[1], known[2])
        if not kind.startswith("output") or tensor.dim() != 2:
            return None
        if not is_router(module):
            return self._mixed_rows(module, tensor, source)
        shape = self._token_shape(module, source)
        if shape is None or tensor.shape[0] != shape[0] * shape[1]:
            return None
        last = EXPERT if tensor.shape[-1] == module.num_experts else "axis2"
        self._rows[id(tensor)] = (weakref.ref(tensor), shape, last)
        return self._reshaped(tensor, shape, last)

    def _mixed_rows(self, module: nn.Module, tensor: torch.Tensor, source: Any
                    ) -> tuple[torch.Tensor, tuple[str, ...]] | None:
        """The experts' output beside a router (their weighted mix, one row per token) as
        (batch, token, hidden), where the rows they were handed are the MoE block's input."""
        parent = self._siblings.get(id(module))
        grid = self._inputs.get(id(parent)) if parent is not None else None
        if (grid is None or not isinstance(source, torch.Tensor) or grid.shape[0] != self._batch
                or not _same_rows(source, grid) or tensor.shape[0] != source.shape[0]):
            return None
        last = "hidden" if tensor.shape[-1] == grid.shape[2] else "axis2"
        return self._reshaped(tensor, (grid.shape[0], grid.shape[1]), last)

    def _token_shape(self, module: nn.Module, source: Any) -> tuple[int, int] | None:
        """(batch, token) whose row-major flattening the router's input rows are."""
        if not isinstance(source, torch.Tensor) or self._batch is None:
            return None
        if source.dim() == 3:  # a (batch, token, hidden) input it flattens itself
            grid: _Grid | None = _Grid(source.data_ptr(), tuple(source.shape), source.dtype,
                                       source.is_contiguous())
        else:
            grid = self._flattened_from(module, source)
        if grid is None or grid.shape[0] != self._batch or not grid.contiguous:
            return None
        return grid.shape[0], grid.shape[1]

    def _flattened_from(self, module: nn.Module, rows: torch.Tensor) -> _Grid | None:
        """The parent's (batch, token, hidden) input whose rows ``rows`` are, if it is."""
        parent = self._parents.get(id(module))
        grid = self._inputs.get(id(parent)) if parent is not None else None
        if grid is None or rows.dim() != 2 or not _same_rows(rows, grid):
            return None
        return grid

    @staticmethod
    def _reshaped(tensor: torch.Tensor, shape: tuple[int, int], last: str
                  ) -> tuple[torch.Tensor, tuple[str, ...]]:
        rows = tensor.reshape(*shape, *tensor.shape[1:])
        roles = ("batch", "token", *default_roles(rows.dim())[2:-1], last)
        return rows, roles


class _Grid(NamedTuple):
    """A (batch, token, hidden) tensor, described."""

    data_ptr: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    contiguous: bool


def _same_rows(rows: torch.Tensor, grid: _Grid) -> bool:
    """Whether ``rows`` is ``grid`` (contiguous (batch, token, hidden)) viewed as
    (batch·token, hidden): the same memory, in the same order."""
    return (rows.data_ptr() == grid.data_ptr and rows.is_contiguous() and grid.contiguous
            and tuple(rows.shape) == (grid.shape[0] * grid.shape[1], grid.shape[2])
            and rows.dtype == grid.dtype)
