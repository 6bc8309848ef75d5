"""The conformance suite on Keras 3, on the backend Keras runs on in this process (TensorFlow
here; tests/backends/test_keras_backends.py runs this module again on JAX and PyTorch)."""

from __future__ import annotations

from layerscope.backends import get_backend
from layerscope.testing import ConformanceSuite

from .kit_tensorflow import TensorFlowKit


class TestTensorFlowConformance(ConformanceSuite):
    kit = TensorFlowKit()

    def test_keras_names(self) -> None:
        """keras/<backend> is an alias of the registry name ``tensorflow``, as is keras."""
        backend = self._backend()
        assert get_backend("tensorflow") is backend and get_backend("keras") is backend
        assert backend.framework_version().startswith("keras "), backend.framework_version()
