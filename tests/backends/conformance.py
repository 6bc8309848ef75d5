"""The conformance suite every backend passes.

A framework provides a *kit* (tests/backends/kit_<framework>.py) that builds four tiny models
(an MLP, a transformer, a CNN and an RNN), runs them, and computes what a layer returns by the
framework's own means. A test module subclasses :class:`ConformanceSuite` with ``kit = ...``;
every test here then runs for that framework.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

import layerscope

KINDS = ("mlp", "transformer", "cnn", "rnn")
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
    extra: dict[str, Any] = field(default_factory=dict)


class Kit(Protocol):
    framework: str

    def build(self, kind: str) -> Case:
        """A fresh tiny model of ``kind`` (one of KINDS) with fixed weights."""

    def run(self, case: Case, batch: int) -> None:
        """One forward pass on the deterministic inputs of batch number ``batch``."""

    def reference(self, case: Case, batch: int, site: str) -> np.ndarray:
        """What the layer at ``site`` returns for batch ``batch``, computed by the framework
        itself (no layerscope), in the framework's own layout, batch axis first."""

    def reference_attention(self, case: Case, batch: int) -> np.ndarray:
        """The attention probabilities of ``case.attention_site`` for batch ``batch``,
        (batch, head, query, key), computed by the framework itself."""

    def hook_state(self, case: Case) -> Any:
        """A comparable snapshot of every hook/wrapper on the model (equal means restored)."""

    def failing(self, case: Case, error: BaseException) -> AbstractContextManager[None]:
        """While active, the model's forward raises ``error`` from inside a layer."""


def _store(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.zarr"


class ConformanceSuite:
    kit: Kit

    def _trace(self, case: Case, path: Path, batches: int = BATCHES, **kwargs: Any) -> Any:
        with layerscope.trace(case.model, path, capture=list(case.sites), **kwargs):
            for batch in range(batches):
                self.kit.run(case, batch)
        return layerscope.open_trace(path)

    @pytest.mark.parametrize("kind", KINDS)
    def test_backend_detected(self, kind: str) -> None:
        case = self.kit.build(kind)
        from layerscope.backends import detect

        assert detect(case.model).name == self.kit.framework

    @pytest.mark.parametrize("kind", KINDS)
    def test_outputs_equal_framework_values(self, kind: str, tmp_path: Path) -> None:
        case = self.kit.build(kind)
        ds = self._trace(case, _store(tmp_path, kind))
        assert ds.attrs["framework"] == self.kit.framework
        assert ds.attrs["committed_batches"] == BATCHES
        assert ds.sizes["batch"] == BATCHES * case.batch_size
        for site in case.sites:
            stored = ds[f"{site}@output"]
            for batch in range(BATCHES):
                rows = slice(batch * case.batch_size, (batch + 1) * case.batch_size)
                expected = self.kit.reference(case, batch, site)
                np.testing.assert_array_equal(stored.isel(batch=rows).values, expected,
                                              err_msg=f"{site} batch {batch}")

    @pytest.mark.parametrize("kind", KINDS)
    def test_dims_are_named_by_role(self, kind: str, tmp_path: Path) -> None:
        case = self.kit.build(kind)
        ds = self._trace(case, _store(tmp_path, kind), batches=1)
        for site, roles in case.sites.items():
            var = ds[f"{site}@output"]
            assert tuple(var.attrs["roles"]) == roles, site
            assert var.attrs["site"] == site
            assert var.attrs["framework"] == self.kit.framework

    def test_attention_probabilities(self, tmp_path: Path) -> None:
        case = self.kit.build("transformer")
        assert case.attention_site is not None
        ds = self._trace(case, _store(tmp_path, "attention"))
        attention = ds[f"{case.attention_site}@attention"]
        assert attention.dims == ("batch", "head", "query", "key")
        for batch in range(BATCHES):
            rows = slice(batch * case.batch_size, (batch + 1) * case.batch_size)
            np.testing.assert_allclose(attention.isel(batch=rows).values,
                                       self.kit.reference_attention(case, batch),
                                       rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(attention.sum("key").values, 1.0, rtol=1e-5)

    def test_glob_selection(self, tmp_path: Path) -> None:
        case = self.kit.build("mlp")
        first = next(iter(case.sites))
        pattern = first[:-1] + "*" if len(first) > 1 else first
        path = _store(tmp_path, "glob")
        with layerscope.trace(case.model, path, capture=[pattern]):
            self.kit.run(case, 0)
        captured = {v.split("@")[0] for v in layerscope.captured_names(layerscope.open_trace(path))}
        assert first in captured
        assert all(_fnmatch(site, pattern) for site in captured)
        assert captured != set(case.sites) or len(case.sites) == 1

    def test_append_mode_adds_batches(self, tmp_path: Path) -> None:
        case = self.kit.build("mlp")
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

    @pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()],
                             ids=["exception", "keyboard-interrupt"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_hooks_removed_after_failure(self, kind: str, error: BaseException,
                                         tmp_path: Path) -> None:
        case = self.kit.build(kind)
        before = self.kit.hook_state(case)
        path = _store(tmp_path, "fail")
        with pytest.raises(type(error)):
            with layerscope.trace(case.model, path, capture=list(case.sites)):
                self.kit.run(case, 0)
                with self.kit.failing(case, error):
                    self.kit.run(case, 1)
        assert self.kit.hook_state(case) == before
        with pytest.warns(UserWarning, match="aborted"):
            ds = layerscope.open_trace(path)
        assert ds.attrs["status"] == "aborted"
        assert ds.attrs["committed_batches"] == 1  # the batch before the failure is kept
        site = next(iter(case.sites))
        np.testing.assert_array_equal(ds[f"{site}@output"].values, self.kit.reference(case, 0, site))
        # the model still works and can be traced again
        self._trace(case, _store(tmp_path, "again"), batches=1)


def _fnmatch(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


