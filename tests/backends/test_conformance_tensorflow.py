from layerscope.testing import ConformanceSuite

from .kit_tensorflow import TensorFlowKit


class TestTensorFlowConformance(ConformanceSuite):
    kit = TensorFlowKit()
