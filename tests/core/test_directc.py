"""layerscope's C part (core/_directc.c): built where the tests run, and its copy exact."""

from __future__ import annotations

import os

import numpy as np
import pytest

from layerscope.core import direct


def test_the_c_part_is_built_and_used() -> None:
    if os.environ.get("LAYERSCOPE_PURE_PYTHON"):
        pytest.skip("LAYERSCOPE_PURE_PYTHON is set: the Python alone")
    assert direct._directc is not None, "core/_directc.c was not built: make test installs it"
    assert direct._memmove is direct._directc.copy
    assert direct.OutputHook is direct._directc.OutputHook


@pytest.mark.parametrize("count", [0, 1, 15, 64, 255, 256, 4095, 4096, 4097, 16384, 16391,
                                   100_003])
def test_copy_moves_exactly_the_bytes_asked_for(count: int) -> None:
    """Small copies go through ``memmove``, large ones around the caches (16-byte stores
    from the first aligned address, the head and tail apart): every byte asked for is
    copied, at every alignment of either side, and none beside it is touched."""
    generator = np.random.default_rng(count)
    source = generator.integers(0, 256, count + 64, dtype=np.uint8)
    for source_offset in (0, 3, 16):
        for dest_offset in (0, 1, 7, 8, 15, 16):
            dest = np.full(count + 64, 0xA5, dtype=np.uint8)
            direct._memmove(dest.ctypes.data + dest_offset, source.ctypes.data + source_offset,
                            count)
            np.testing.assert_array_equal(
                dest[dest_offset:dest_offset + count],
                source[source_offset:source_offset + count])
            assert (dest[:dest_offset] == 0xA5).all() and (dest[dest_offset + count:] == 0xA5).all()


def test_copy_refuses_what_is_not_three_ints() -> None:
    if direct._directc is None:
        pytest.skip("the C part is not used")
    with pytest.raises(TypeError):
        direct._directc.copy(1, 2)
    with pytest.raises(TypeError):
        direct._directc.copy(1, 2, "3")
