"""The conformance suite on Keras 3, on the backend Keras runs on in this process (TensorFlow
here; tests/backends/test_keras_backends.py runs this module again on JAX and PyTorch)."""

from __future__ import annotations

import sys

import pytest

from layerscope.backends import ALIASES, BUILTIN, Backend, available, detect, get_backend
from layerscope.core import BackendError
from layerscope.testing import KINDS, ConformanceSuite

from .kit_tensorflow import TensorFlowKit


class TestTensorFlowConformance(ConformanceSuite):
    kit = TensorFlowKit()

    # The Keras backend's name, keras/<backend>, is an alias of its registry name
    # ``tensorflow``, which ``available()`` lists. The suite's two registry tests take a
    # backend's name to be its registry name; here they are, with that one difference.

    def test_backend_is_registered_and_conforms(self) -> None:
        assert ALIASES[self.kit.framework] in available()
        backend = self._backend()
        assert get_backend("tensorflow") is backend and get_backend("keras") is backend
        assert isinstance(backend, Backend)
        assert backend.name == self.kit.framework, (backend.name, self.kit.framework)
        assert isinstance(backend.extra, str)
        version = backend.framework_version()
        assert isinstance(version, str) and version.startswith("keras "), version

    @pytest.mark.parametrize("kind", KINDS)
    def test_backend_detected(self, kind: str) -> None:
        self._need_kind(kind)
        case = self.kit.build(kind)
        backend = detect(case.model)
        assert backend.name == self.kit.framework, (backend.name, self.kit.framework)
        assert backend is self._backend()
        claimed = [other.name for other in _other_backends(backend)
                   if other.can_handle(case.model)]
        assert not claimed, f"backends {claimed} also claim a {self.kit.framework} {kind} model"


def _other_backends(mine: Backend) -> list[Backend]:
    """Every other backend detect would ask: built-ins whose framework is imported (on
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
