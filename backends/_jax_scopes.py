"""Capturing plain JAX functions by their ``jax.named_scope`` names.

The function is traced once per input signature to a jaxpr, whose equations carry the name
stack they were traced under. A scope's *outputs* are the values computed inside it that are
used after it (or returned); its *inputs* the values it uses that were computed before it.
Calls to jitted helpers that contain scopes are inlined, so their scopes count too.
``jax.nn.softmax`` results are marked while tracing; the last one inside a scope whose name
ends with ``attention`` is that scope's attention probabilities.

The jaxpr is then evaluated with the captured values as extra outputs. For a jitted function
that evaluation is itself compiled with ``jax.jit``: one XLA computation that returns the
model's outputs and the captured values together. For an eager function it runs eagerly,
primitive by primitive, as the function itself would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core

from layerscope.core import Selection
from layerscope.core.naming import ROOT_SITE

from ._jax_attention import AttentionTaps, is_attention_scope
from ._jax_dims import batch_of, is_array, is_tracer, roles_for
from ._jax_reduce import pass_masks, reduced
from ._jax_runtime import Item, Sink, uncaptured
from ._structure import part_kind

MARK = "layerscope.attention_probabilities"
_CALLS = ("jit", "pjit", "closed_call", "core_call")
SCOPE_TYPE = "named_scope"
#: (kind, site) -> whether the selection takes it (Selection.wants)
Wants = Callable[[str, str], bool]


def _is_user_scope(name: str) -> bool:
    """Scopes JAX opens itself: ``jnp.einsum`` names its call after the spec (``ij,jk->ik``),
    ``jax.checkpoint`` wraps its body in ``rematted_computation``."""
    return "->" not in name and "," not in name and name != "rematted_computation"


def _scopes(name_stack: Any) -> tuple[str, ...]:
    return tuple(str(e.name).replace("/", ".") for e in name_stack.stack
                 if type(e).__name__ == "Scope" and _is_user_scope(str(e.name)))


def _inner(eqn: Any) -> Any:
    jaxpr = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(jaxpr, jex_core.Jaxpr):
        return jex_core.ClosedJaxpr(jaxpr, [])
    return jaxpr


def _is_mark(eqn: Any) -> bool:
    return eqn.primitive.name == "name" and eqn.params.get("name") == MARK


def _has_scopes(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if _scopes(eqn.source_info.name_stack) or _is_mark(eqn):
            return True
        if eqn.primitive.name in _CALLS and _has_scopes(_inner(eqn).jaxpr):
            return True
    return False


class _Flat:
    """A jaxpr with the calls that hold scopes inlined, and each equation's scope path."""

    def __init__(self, closed: Any) -> None:
        self.eqns: list[Any] = []
        self.paths: list[tuple[str, ...]] = []
        self.constvars: list[Any] = list(closed.jaxpr.constvars)
        self.consts: list[Any] = list(closed.consts)
        self.subst: dict[Any, Any] = {}
        self._add(closed.jaxpr, (), fresh=False)
        self.invars = list(closed.jaxpr.invars)
        self.outvars = [self._atom(v) for v in closed.jaxpr.outvars]

    def _atom(self, atom: Any) -> Any:
        return self.subst.get(atom, atom) if isinstance(atom, jex_core.Var) else atom

    def _fresh(self, var: Any) -> Any:
        if isinstance(var, jex_core.DropVar):
            return var
        new = jex_core.Var(var.aval)
        self.subst[var] = new
        return new

    def _add(self, jaxpr: Any, prefix: tuple[str, ...], fresh: bool) -> None:
        for eqn in jaxpr.eqns:
            path = prefix + _scopes(eqn.source_info.name_stack)
            invars = [self._atom(a) for a in eqn.invars]
            inner = _inner(eqn) if eqn.primitive.name in _CALLS else None
            if inner is not None and _has_scopes(inner.jaxpr):
                for var, const in zip(inner.jaxpr.constvars, inner.consts, strict=True):
                    self.constvars.append(self._fresh(var))
                    self.consts.append(const)
                for var, atom in zip(inner.jaxpr.invars, invars, strict=True):
                    self.subst[var] = atom
                self._add(inner.jaxpr, path, fresh=True)
                for var, atom in zip(eqn.outvars, inner.jaxpr.outvars, strict=True):
                    self.subst[var] = self._atom(atom)
                continue
            outvars = [self._fresh(v) for v in eqn.outvars] if fresh else list(eqn.outvars)
            self.eqns.append(eqn.replace(invars=invars, outvars=outvars))
            self.paths.append(path)


@dataclass
class _Run:
    """Consecutive equations under one scope path: one call of that scope."""

    prefix: tuple[str, ...]
    start: int
    end: int
    attention: Any = None


def _runs(paths: list[tuple[str, ...]]) -> list[_Run]:
    runs: list[_Run] = []
    open_runs: dict[tuple[str, ...], _Run] = {}
    for index, path in enumerate(paths):
        prefixes = [path[:n] for n in range(1, len(path) + 1)]
        for prefix in [p for p in open_runs if p not in prefixes]:
            del open_runs[prefix]
        for prefix in prefixes:
            if prefix in open_runs:
                open_runs[prefix].end = index
            else:
                open_runs[prefix] = _Run(prefix, index, index)
                runs.append(open_runs[prefix])
    return runs


@dataclass
class Program:
    """The traced function with the selected values as extra outputs."""

    jaxpr: Any
    consts: list[Any]
    n_out: int
    out_tree: Any
    meta: list[tuple[str, str, tuple[str, ...], str]] = field(default_factory=list)

    def run(self, *args: Any) -> tuple[list[Any], list[Any]]:
        values = jax.core.eval_jaxpr(self.jaxpr, self.consts, *args)
        return values[:self.n_out], values[self.n_out:]


def build_program(flat_fn: Callable[..., Any], dynamic: list[Any], wants: Wants,
                  root_type: str, hidden_size: int | None = None) -> Program:
    """Trace ``flat_fn(*dynamic)`` and choose what to capture by scope and selection."""
    taps = AttentionTaps(lambda probs: checkpoint_name(probs, MARK), lambda: True)
    with taps.patched():
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dynamic)
    flat = _Flat(closed)
    producer: dict[Any, int] = {}
    consumers: dict[Any, list[int]] = {}
    for index, eqn in enumerate(flat.eqns):
        for var in eqn.outvars:
            producer[var] = index
        for atom in eqn.invars:
            if isinstance(atom, jex_core.Var):
                consumers.setdefault(atom, []).append(index)
    returned = {v for v in flat.outvars if isinstance(v, jex_core.Var)}
    arguments = set(flat.invars)
    runs = _runs(flat.paths)
    for index, eqn in enumerate(flat.eqns):
        if _is_mark(eqn):
            path = flat.paths[index]
            depth = max((n for n in range(1, len(path) + 1) if is_attention_scope(path[n - 1])),
                        default=0)
            for run in runs:
                if depth and run.prefix == path[:depth] and run.start <= index <= run.end:
                    run.attention = eqn.outvars[0]

    extra: list[Any] = []
    meta: list[tuple[str, str, tuple[str, ...], str]] = []

    def take(site: str, kind: str, var: Any, module_type: str) -> None:
        aval: Any = getattr(var, "aval", None)
        if not isinstance(var, jex_core.Var) or isinstance(var, jex_core.DropVar) or \
                not getattr(aval, "shape", ()):
            return
        shape = tuple(aval.shape)
        extra.append(var)
        meta.append((site, kind, roles_for(None, kind, shape, hidden_size), module_type))

    for run in sorted(runs, key=lambda r: (r.end, -len(r.prefix))):
        site = ".".join(run.prefix)
        inside = range(run.start, run.end + 1)
        if wants("input", site):
            seen: list[Any] = []
            for index in inside:
                for atom in flat.eqns[index].invars:
                    if not isinstance(atom, jex_core.Var) or any(atom is v for v in seen):
                        continue
                    if producer.get(atom, run.start) < run.start or atom in arguments:
                        seen.append(atom)
            for number, var in enumerate(seen):
                take(site, part_kind("input", (str(number),)), var, SCOPE_TYPE)
        if wants("output", site):
            outputs = [v for index in inside for v in flat.eqns[index].outvars
                       if v in returned or any(c > run.end for c in consumers.get(v, ()))]
            for number, var in enumerate(outputs):
                take(site, part_kind("output", (str(number),)), var, SCOPE_TYPE)
        if run.attention is not None and wants("attention", site):
            take(site, "attention", run.attention, SCOPE_TYPE)
    if wants("output", ROOT_SITE):
        paths = [tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                       for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(out_shape)[0]]
        for path, var in zip(paths, flat.outvars, strict=True):
            take(ROOT_SITE, part_kind("output", path), var, root_type)

    effects: set[Any] = set()
    for eqn in flat.eqns:
        effects |= set(eqn.effects)
    info = closed.jaxpr.debug_info.resolve_result_paths()
    names = tuple(info.result_paths or ("",) * len(flat.outvars))
    info = info._replace(result_paths=names + tuple(f"{s}@{k}" for s, k, _, _ in meta))
    jaxpr = jex_core.Jaxpr(flat.constvars, flat.invars, [*flat.outvars, *extra], flat.eqns,
                           effects, info)
    return Program(jaxpr, flat.consts, len(flat.outvars), jax.tree.structure(out_shape), meta)


def is_jitted(fn: Any) -> bool:
    """A function made by ``jax.jit`` (it can be lowered and traced ahead of time)."""
    return callable(fn) and hasattr(fn, "lower") and hasattr(fn, "trace")


class FunctionCapture:
    """Calls a plain JAX function with its named scopes captured (one pass per call)."""

    def __init__(self, fn: Callable[..., Any], selection: Selection, sink: Sink) -> None:
        self.fn = fn
        self.selection = selection
        self.sink = sink
        self.jitted = is_jitted(fn)
        self.root_type = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        self._cache: dict[Any, tuple[Program, Callable[..., Any]]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic_at = [i for i, leaf in enumerate(leaves) if is_array(leaf)]
        dynamic = [leaves[i] for i in dynamic_at]

        def flat_fn(*values: Any) -> Any:
            rebuilt = list(leaves)
            for i, value in zip(dynamic_at, values, strict=True):
                rebuilt[i] = value
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, rebuilt)
            return self.fn(*call_args, **call_kwargs)

        program, runner = self._program(flat_fn, leaves, dynamic_at, dynamic, treedef)
        if self.jitted:
            outs, captured = runner(*dynamic)
        else:
            with uncaptured():  # eager: reuse the operations JAX compiled outside the capture
                outs, captured = runner(*dynamic)
        result = jax.tree_util.tree_unflatten(program.out_tree, outs)
        batch, token_ids = batch_of(args, kwargs)
        returned = next((o for o in outs if is_array(o) and o.ndim >= 1), None)
        if "input_ids" not in kwargs and returned is not None:
            # f(w, x) has no modules to tell weights from inputs: the batch is the leading
            # axis of what the function returns
            batch = int(returned.shape[0])
            if token_ids is not None and int(token_ids.shape[0]) != batch:
                token_ids = None
        if batch is None:
            return result
        items = [Item(site, kind, value, roles, module_type)
                 for (site, kind, roles, module_type), value in zip(program.meta, captured,
                                                                    strict=True)]
        masks = pass_masks(batch, token_ids, kwargs)
        items = reduced(self.sink.recorder, items, masks)  # on the device: only results leave
        mask = masks.masks["token"]
        if any(is_tracer(i.value) for i in items) or is_tracer(token_ids):
            self.sink.emit(batch, token_ids, items, mask)  # called inside the user's own jit
            return result
        self.sink.begin(batch, token_ids, None, mask)
        try:
            for item in items:
                self.sink.put(item)
        except BaseException:
            self.sink.abort()
            raise
        self.sink.end()
        return result

    def _program(self, flat_fn: Callable[..., Any], leaves: list[Any], dynamic_at: list[int],
                 dynamic: list[Any], treedef: Any) -> tuple[Program, Callable[..., Any]]:
        key: Any = None
        if self.jitted:  # like jax.jit itself: one trace per signature
            static = tuple((i, leaf) for i, leaf in enumerate(leaves) if i not in dynamic_at)
            signature = tuple((tuple(d.shape), str(d.dtype), bool(getattr(d, "weak_type", 0)))
                              for d in dynamic)
            key = (treedef, static, signature)
            try:
                hash(key)
            except TypeError:
                key = None
            if key is not None and key in self._cache:
                return self._cache[key]
        program = build_program(flat_fn, dynamic, self.sink.recorder.selection.wants, self.root_type)
        runner = jax.jit(program.run) if self.jitted else program.run
        if key is not None:
            self._cache[key] = (program, runner)
        return program, runner
