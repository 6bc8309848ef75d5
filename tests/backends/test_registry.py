"""Plugin registration (entry point group ``layerscope.backends``) and the optional methods of
the backend contract, with stand-in entry points and backends: no framework is imported."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

import layerscope.backends as backends
from layerscope.backends import (
    Backend,
    FolderLoader,
    TokenizerAdapter,
    folder_loader,
    tokenizer_adapter,
)
from layerscope.core import BackendError, LayerscopeError


class Plain:
    name = "plain"
    extra = "plain"

    def can_handle(self, model: Any) -> bool:
        return isinstance(model, PlainModel)

    def sites(self, model: Any) -> list[Any]:
        return []

    def attach(self, model: Any, selection: Any, recorder: Any) -> Any:
        return nullcontext()

    def to_numpy(self, tensor: Any) -> Any:
        return tensor

    def framework_version(self) -> str:
        return "1"

    def describe(self, model: Any) -> dict[str, Any]:
        return {"class": "PlainModel"}

    def run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return None


class WithExtras(Plain):
    name = "extras"

    def adapt_tokenizer(self, tokenizer: Any, model: Any = None) -> Any:
        return ("adapted", tokenizer)

    def load_folder(self, folder: Path, attn_implementation: str | None = None) -> tuple[Any, Any]:
        return ("model", folder), ("tokenizer", attn_implementation)


class PlainModel:
    pass


class FakeEntryPoint:
    def __init__(self, name: str, value: Any, error: Exception | None = None) -> None:
        self.name, self.value, self.group = name, f"fake:{name}", backends.GROUP
        self._object, self._error = value, error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._object


@pytest.fixture
def plugins(monkeypatch):
    """Install stand-in entry points; returns the list to fill."""
    points: list[FakeEntryPoint] = []
    monkeypatch.setattr(backends, "entry_points", lambda group: list(points))
    monkeypatch.setattr(backends, "_loaded", {})
    return points


def test_plugins_are_listed_after_the_builtins_and_detected(plugins):
    plugins.append(FakeEntryPoint("plain", Plain()))
    assert backends.available() == ["torch", "tensorflow", "jax", "plain"]
    backend = backends.detect(PlainModel())
    assert backend.name == "plain" and backends.get_backend("plain") is backend


def test_an_entry_point_may_name_the_class(plugins):
    plugins.append(FakeEntryPoint("plain", Plain))
    assert isinstance(backends.get_backend("plain"), Plain)


def test_a_plugin_that_is_not_a_backend_is_refused(plugins):
    plugins.append(FakeEntryPoint("broken", object()))
    with pytest.raises(BackendError, match="not a layerscope backend: it lacks name, extra"):
        backends.get_backend("broken")


def test_the_entry_point_is_named_after_the_backend(plugins):
    plugins.append(FakeEntryPoint("other", Plain()))
    with pytest.raises(BackendError, match="gives a backend named 'plain'"):
        backends.get_backend("other")


def test_a_plugin_that_fails_to_import_is_named_and_skipped_by_detect(plugins):
    plugins.append(FakeEntryPoint("failing", None, ImportError("no module named mlx")))
    plugins.append(FakeEntryPoint("plain", Plain()))
    with pytest.raises(BackendError, match="the failing backend .* failed to load: ImportError"):
        backends.get_backend("failing")
    with pytest.warns(UserWarning, match="failing backend"):
        assert backends.detect(PlainModel()).name == "plain"


def test_unknown_backend(plugins):
    with pytest.raises(BackendError, match="unknown backend 'nope'; known: torch"):
        backends.get_backend("nope")


def test_optional_methods_have_defaults():
    plain, extras = Plain(), WithExtras()
    assert isinstance(plain, Backend) and isinstance(extras, Backend)
    assert not isinstance(plain, TokenizerAdapter) and isinstance(extras, TokenizerAdapter)
    assert not isinstance(plain, FolderLoader) and isinstance(extras, FolderLoader)
    tokenizer = object()
    assert tokenizer_adapter(plain)(tokenizer, None) is tokenizer
    assert tokenizer_adapter(extras)(tokenizer, None) == ("adapted", tokenizer)
    assert folder_loader(plain) is None
    loader = folder_loader(extras)
    assert loader is not None
    assert loader(Path("m"), "eager") == (("model", Path("m")), ("tokenizer", "eager"))


def test_capture_adapts_the_tokenizer_through_the_contract(plugins, monkeypatch, tmp_path):
    """``capture`` hands its tokenizer to the backend's ``adapt_tokenizer`` (and only then
    tokenizes), for any backend that has one."""
    import layerscope

    seen: list[Any] = []

    class Adapting(WithExtras):
        def adapt_tokenizer(self, tokenizer: Any, model: Any = None) -> Any:
            seen.append((tokenizer, model))
            raise RuntimeError("adapted")

    plugins.append(FakeEntryPoint("extras", Adapting()))
    model = PlainModel()
    with pytest.raises(RuntimeError, match="adapted"):
        layerscope.capture(model, ["a text"], tmp_path / "t.zarr", tokenizer="tok")
    assert seen == [("tok", model)]


def test_folder_loading_goes_through_the_contract(monkeypatch, tmp_path):
    from layerscope import loading

    monkeypatch.setattr("layerscope.backends.get_backend", lambda name: WithExtras())
    loaded = loading.load_hf_folder(tmp_path, "jax", "sdpa")
    assert loaded.model == ("model", tmp_path) and loaded.tokenizer == ("tokenizer", "sdpa")
    monkeypatch.setattr("layerscope.backends.get_backend", lambda name: Plain())
    with pytest.raises(LayerscopeError, match="cannot load Hugging Face folders"):
        loading.load_hf_folder(tmp_path, "jax", None)
