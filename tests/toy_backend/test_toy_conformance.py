"""The toy NumPy backend, a fourth backend installed as a third party's would be, passes
layerscope's shipped conformance suite."""

from layerscope.testing import ConformanceSuite

from .kit_toy import ToyKit


class TestToyConformance(ConformanceSuite):
    kit = ToyKit()
