"""The backend conformance suite, shipped so that every backend, built in or third party, runs it.

This module needs pytest (``pip install pytest``; ``layerscope[dev]`` has it). Importing it
imports no framework.

A backend is tested with a *kit*: a :class:`Kit` subclass that builds tiny models in the
framework (an MLP, a transformer, a CNN, an RNN), runs them on fixed inputs, and computes what
a layer returns by the framework's own means, without layerscope. A test module subclasses
:class:`ConformanceSuite` with ``kit = MyKit()``; every test of the suite then runs against
that backend::

    from layerscope.testing import Case, ConformanceSuite, Kit

    class MlxKit(Kit):
        framework = "mlx"          # the backend's name (its entry point's name)
        kinds = ("mlp", "cnn")     # the models build() can make
        attention = False          # no attention probabilities to capture
        ...

    class TestMlxConformance(ConformanceSuite):
        kit = MlxKit()

What a backend or its framework cannot do is declared by the kit's capability flags
(:attr:`Kit.kinds`, :attr:`Kit.attention`, :attr:`Kit.keyboard_interrupt`,
:attr:`Kit.numpy_inputs`); the tests that need it are then skipped with a reason naming the
flag, and the suite itself is never edited. The contract the suite checks is written down in
:mod:`layerscope.backends.base`.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import layerscope
from layerscope.backends import ALIASES, BUILTIN, Backend, available, detect, get_backend
from layerscope.core import BackendError, StoreOptions

#: the tiny models a kit can build
KINDS = ("mlp", "transformer", "cnn", "rnn")
#: forward passes per trace in the suite
BATCHES = 3


@dataclass
class Case:
    """A tiny model and what the suite expects of its trace."""

    model: Any
    #: site -> expected dim roles of ``<site>@output``; every listed site is captured
    sites: dict[str, tuple[str, ...]]
    batch_size: int
    #: the transformer's attention site; its ``@attention`` is (batch, head, query, key)
    attention_site: str | None = None
    #: anything the kit wants to keep with the case
    extra: dict[str, Any] = field(default_factory=dict)


class Kit(ABC):
    """Tiny models of one framework, and the framework's own answers about them.

    Subclass it, set :attr:`framework`, implement the abstract methods, and set a capability
    flag to False (or narrow :attr:`kinds`) for what the backend cannot do.
    """

    #: the backend's name: ``detect`` must pick the backend of this name for the kit's models
    framework: ClassVar[str]

    # -- capability flags ------------------------------------------------------------------

    #: the models :meth:`build` makes, a subset of :data:`KINDS`; tests of the others skip
    kinds: ClassVar[tuple[str, ...]] = KINDS
    #: the backend captures attention probabilities: the transformer's ``attention_site``
    #: yields ``@attention`` and :meth:`reference_attention` is implemented
    attention: ClassVar[bool] = True
    #: a ``KeyboardInterrupt`` raised inside the forward reaches the caller as one (False for
    #: a framework whose native code turns it into something else)
    keyboard_interrupt: ClassVar[bool] = True
    #: ``layerscope.capture`` can run the models on NumPy arrays through ``Backend.run``, and
    #: :meth:`array_input` is implemented
    numpy_inputs: ClassVar[bool] = True

    # -- what every kit implements ---------------------------------------------------------

    @abstractmethod
    def build(self, kind: str) -> Case:
        """A fresh tiny model of ``kind`` (one of :attr:`kinds`) with fixed weights. Where the
        framework has in-place operations, use one (the MLP's activation, say): the suite then
        checks that captured tensors are copied before the model changes them."""

    @abstractmethod
    def run(self, case: Case, batch: int) -> None:
        """One forward pass on the deterministic inputs of batch number ``batch``
        (``case.batch_size`` samples), called the way a user calls the model."""

    @abstractmethod
    def reference(self, case: Case, batch: int, site: str) -> np.ndarray:
        """What the layer at ``site`` returns for batch ``batch``, computed by the framework
        itself (no layerscope), batch axis first, in the framework's own layout."""

    @abstractmethod
    def hook_state(self, case: Case) -> Any:
        """A comparable snapshot of every hook and wrapper on the model and its classes
        (equal before and after a trace means everything was restored)."""

    @abstractmethod
    def failing(self, case: Case, error: BaseException) -> AbstractContextManager[None]:
        """While active, a forward pass of the model raises ``error`` from inside a layer
        (not from its top-level call)."""

    # -- what some kits implement (see the flags) ------------------------------------------

    def reference_attention(self, case: Case, batch: int) -> np.ndarray:
        """The attention probabilities at ``case.attention_site`` for batch ``batch``,
        (batch, head, query, key), computed by the framework itself. Needed with
        :attr:`attention`."""
        raise NotImplementedError(f"{type(self).__name__}.reference_attention, or attention = False")

    def array_input(self, case: Case, batch: int) -> np.ndarray:
        """The input of batch ``batch`` as a NumPy array: ``Backend.run`` turns it into the
        framework's tensor. Needed with :attr:`numpy_inputs`."""
        raise NotImplementedError(f"{type(self).__name__}.array_input, or numpy_inputs = False")


def _store(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.zarr"


def _rows(case: Case, batch: int) -> slice:
    return slice(batch * case.batch_size, (batch + 1) * case.batch_size)


class ConformanceSuite:
    """Every test a backend passes. Subclass it as ``Test<Framework>Conformance`` with
    ``kit = <a Kit>``; pytest collects the subclass."""

    kit: ClassVar[Kit]

    # -- helpers ---------------------------------------------------------------------------

    def _need_kind(self, kind: str) -> None:
        if kind not in self.kit.kinds:
            pytest.skip(f"the {self.kit.framework} kit builds no {kind} model (Kit.kinds)")

    def _some_kind(self) -> str:
        """The MLP where the kit builds one, else its first kind."""
        return "mlp" if "mlp" in self.kit.kinds else self.kit.kinds[0]

    def _backend(self) -> Backend:
        return get_backend(self.kit.framework)

    def _trace(self, case: Case, path: Path, batches: int = BATCHES, **kwargs: Any) -> Any:
        with layerscope.trace(case.model, path, capture=list(case.sites), **kwargs):
            for batch in range(batches):
                self.kit.run(case, batch)
        return layerscope.open_trace(path)

    def _assert_outputs(self, ds: Any, case: Case, batches: int = BATCHES) -> None:
        for site in case.sites:
            stored = ds[f"{site}@output"]
            for batch in range(batches):
                np.testing.assert_array_equal(
                    stored.isel(batch=_rows(case, batch)).values,
                    self.kit.reference(case, batch, site),
                    err_msg=f"{self.kit.framework}: {site}@output, batch {batch}")

    # -- finding the backend ---------------------------------------------------------------

    def test_backend_is_registered_and_conforms(self) -> None:
        # the framework may be an alias of a registered name (keras/jax of tensorflow)
        names = available()
        registered = ALIASES.get(self.kit.framework, self.kit.framework)
        assert registered in names, f"{self.kit.framework!r} not in {names}"
        backend = self._backend()
        assert isinstance(backend, Backend), f"{backend!r} lacks members of Backend"
        assert backend.name == self.kit.framework, (backend.name, self.kit.framework)
        assert isinstance(backend.extra, str)
        version = backend.framework_version()
        assert isinstance(version, str) and version, f"framework_version() gave {version!r}"

    @pytest.mark.parametrize("kind", KINDS)
    def test_backend_detected(self, kind: str) -> None:
        self._need_kind(kind)
        case = self.kit.build(kind)
        backend = detect(case.model)
        assert backend.name == self.kit.framework, (backend.name, self.kit.framework)
        assert backend is self._backend()
        claimed = [b.name for b in _other_backends(backend) if b.can_handle(case.model)]
        assert not claimed, f"backends {claimed} also claim a {self.kit.framework} {kind} model"

    @pytest.mark.parametrize("kind", KINDS)
    def test_sites_list_every_case_site(self, kind: str) -> None:
        self._need_kind(kind)
        case = self.kit.build(kind)
        infos = layerscope.sites(case.model)
        paths = [info.path for info in infos]
        assert len(paths) == len(set(paths)), f"site paths repeat: {paths}"
        missing = set(case.sites) - set(paths)
        assert not missing, f"sites() lacks {sorted(missing)}; it lists {paths}"
        if case.attention_site is not None and self.kit.attention:
            flagged = {info.path for info in infos if info.is_attention}
            assert case.attention_site in flagged, f"{case.attention_site} not marked attention"

    def test_model_described(self, tmp_path: Path) -> None:
        case = self.kit.build(self._some_kind())
        described = self._backend().describe(case.model)
        described = json.loads(json.dumps(described))  # JSON-able, as the store keeps it
        assert isinstance(described.get("class"), str) and described["class"], described
        ds = self._trace(case, _store(tmp_path, "described"), batches=1)
        assert ds.attrs["framework"] == self.kit.framework
        assert ds.attrs["model"] == described
        assert ds.attrs["framework_version"] == self._backend().framework_version()

    # -- what is stored --------------------------------------------------------------------

    @pytest.mark.parametrize("kind", KINDS)
    def test_outputs_equal_framework_values(self, kind: str, tmp_path: Path) -> None:
        self._need_kind(kind)
        case = self.kit.build(kind)
        ds = self._trace(case, _store(tmp_path, kind))
        assert ds.attrs["framework"] == self.kit.framework
        assert ds.attrs["status"] == "complete"
        assert ds.attrs["committed_batches"] == BATCHES
        assert ds.sizes["batch"] == BATCHES * case.batch_size
        self._assert_outputs(ds, case)

    @pytest.mark.parametrize("kind", KINDS)
    def test_dims_are_named_by_role(self, kind: str, tmp_path: Path) -> None:
        self._need_kind(kind)
        case = self.kit.build(kind)
        ds = self._trace(case, _store(tmp_path, kind), batches=1)
        for site, roles in case.sites.items():
            var = ds[f"{site}@output"]
            assert tuple(var.attrs["roles"]) == roles, (site, var.attrs["roles"], roles)
            assert var.attrs["site"] == site
            assert var.attrs["framework"] == self.kit.framework

    def test_attention_probabilities(self, tmp_path: Path) -> None:
        self._need_kind("transformer")
        if not self.kit.attention:
            pytest.skip(f"the {self.kit.framework} backend captures no attention (Kit.attention)")
        case = self.kit.build("transformer")
        assert case.attention_site is not None, "the transformer case names no attention_site"
        ds = self._trace(case, _store(tmp_path, "attention"))
        attention = ds[f"{case.attention_site}@attention"]
        assert attention.dims == ("batch", "head", "query", "key")
        for batch in range(BATCHES):
            np.testing.assert_allclose(attention.isel(batch=_rows(case, batch)).values,
                                       self.kit.reference_attention(case, batch),
                                       rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(attention.sum("key").values, 1.0, rtol=1e-5)

    def test_glob_selection(self, tmp_path: Path) -> None:
        case = self.kit.build(self._some_kind())
        first = next(iter(case.sites))
        pattern = first[:-1] + "*" if len(first) > 1 else first
        path = _store(tmp_path, "glob")
        with layerscope.trace(case.model, path, capture=[pattern]):
            self.kit.run(case, 0)
        captured = {v.split("@")[0] for v in layerscope.captured_names(layerscope.open_trace(path))}
        assert first in captured
        assert all(fnmatch.fnmatchcase(site, pattern) for site in captured), (pattern, captured)
        assert captured != set(case.sites) or len(case.sites) == 1

    def test_append_mode_adds_batches(self, tmp_path: Path) -> None:
        case = self.kit.build(self._some_kind())
        path = _store(tmp_path, "append")
        self._trace(case, path, batches=2)
        with layerscope.trace(case.model, path, capture=list(case.sites), mode="a"):
            self.kit.run(case, 2)
        ds = layerscope.open_trace(path)
        assert ds.attrs["committed_batches"] == 3
        np.testing.assert_array_equal(ds["batch"].values, np.arange(3 * case.batch_size))
        site = next(iter(case.sites))
        np.testing.assert_array_equal(
            ds[f"{site}@output"].isel(batch=slice(2 * case.batch_size, None)).values,
            self.kit.reference(case, 2, site),
        )

    def test_capture_runs_numpy_inputs(self, tmp_path: Path) -> None:
        """``layerscope.capture`` calls ``Backend.run`` with NumPy arrays, one pass each."""
        if not self.kit.numpy_inputs:
            pytest.skip(f"the {self.kit.framework} kit runs no NumPy inputs (Kit.numpy_inputs)")
        case = self.kit.build(self._some_kind())
        inputs = [self.kit.array_input(case, batch) for batch in range(BATCHES)]
        assert all(isinstance(x, np.ndarray) for x in inputs), "array_input must give NumPy"
        ds = layerscope.capture(case.model, inputs, _store(tmp_path, "numpy"),
                                capture=list(case.sites))
        assert ds.attrs["committed_batches"] == BATCHES
        self._assert_outputs(ds, case)

    def test_tiny_memory_budget(self, tmp_path: Path) -> None:
        """With a one-byte budget every ``put`` waits until the writer threads have turned the
        previous tensor into NumPy: ``nbytes`` is counted and given back exactly, and
        ``to_numpy`` needs nothing from the model's thread."""
        kind = "transformer" if "transformer" in self.kit.kinds else self._some_kind()
        case = self.kit.build(kind)
        ds = self._trace(case, _store(tmp_path, "budget"),
                         options=StoreOptions(max_pending_bytes=1))
        self._assert_outputs(ds, case)

    # -- failures --------------------------------------------------------------------------

    @pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()],
                             ids=["exception", "keyboard-interrupt"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_hooks_removed_after_failure(self, kind: str, error: BaseException,
                                         tmp_path: Path) -> None:
        self._need_kind(kind)
        if isinstance(error, KeyboardInterrupt) and not self.kit.keyboard_interrupt:
            pytest.skip(f"{self.kit.framework} does not pass KeyboardInterrupt through "
                        "(Kit.keyboard_interrupt)")
        case = self.kit.build(kind)
        before = self.kit.hook_state(case)
        path = _store(tmp_path, "fail")
        with pytest.raises(type(error)):
            with layerscope.trace(case.model, path, capture=list(case.sites)):
                self.kit.run(case, 0)
                with self.kit.failing(case, error):
                    self.kit.run(case, 1)
        assert self.kit.hook_state(case) == before, "hooks or wrappers left on the model"
        with pytest.warns(UserWarning, match="aborted"):
            ds = layerscope.open_trace(path)
        assert ds.attrs["status"] == "aborted"
        assert ds.attrs["committed_batches"] == 1  # the batch before the failure is kept
        site = next(iter(case.sites))
        np.testing.assert_array_equal(ds[f"{site}@output"].values, self.kit.reference(case, 0, site))
        # the model still works and can be traced again
        again = self._trace(case, _store(tmp_path, "again"), batches=1)
        self._assert_outputs(again, case, batches=1)

    def test_hooks_removed_when_the_block_raises(self, tmp_path: Path) -> None:
        """An error in the user's code inside the block (not in the model) also restores
        everything and keeps the passes that completed."""
        case = self.kit.build(self._some_kind())
        before = self.kit.hook_state(case)
        path = _store(tmp_path, "block")
        with pytest.raises(ValueError, match="user code"):
            with layerscope.trace(case.model, path, capture=list(case.sites)):
                self.kit.run(case, 0)
                raise ValueError("user code")
        assert self.kit.hook_state(case) == before, "hooks or wrappers left on the model"
        with pytest.warns(UserWarning, match="aborted"):
            ds = layerscope.open_trace(path)
        assert ds.attrs["committed_batches"] == 1
        self.kit.run(case, 1)  # runs untraced


def _other_backends(mine: Backend) -> list[Backend]:
    """The other backends ``detect`` would ask: built-ins whose framework is imported (on
    Keras's PyTorch backend, the torch one), and every plugin that loads."""
    found = []
    for name in available():
        if name in BUILTIN and not set(BUILTIN[name][2]) & set(sys.modules):
            continue
        try:
            backend = get_backend(name)
        except BackendError:
            continue
        if backend is not mine:
            found.append(backend)
    return found


__all__ = ["BATCHES", "KINDS", "Case", "ConformanceSuite", "Kit"]
