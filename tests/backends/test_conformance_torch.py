from layerscope.testing import ConformanceSuite

from .kit_torch import TorchKit


class TestTorchConformance(ConformanceSuite):
    kit = TorchKit()
