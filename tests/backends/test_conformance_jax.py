from layerscope.testing import ConformanceSuite

from .kit_jax import JaxJitKit, JaxKit


class TestJaxConformance(ConformanceSuite):
    kit = JaxKit()


class TestJaxJitConformance(ConformanceSuite):
    """The suite again with every forward pass compiled by ``nnx.jit``."""

    kit = JaxJitKit()
