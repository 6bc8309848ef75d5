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
    assert direct.Forward is direct._directc.Forward


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


def test_forward_calls_the_forward_then_the_hook_as_torch_does() -> None:
    """``Forward(forward, module, hook)``: the forward's result returned as it is; the hook
    given (module, positional args, keyword args, output), as a forward hook with kwargs is;
    its result ignored; an error of either raised; nothing called once the hook is None."""
    if direct._directc is None:
        pytest.skip("the C part is not used")
    calls: list[tuple] = []
    module = object()

    def forward(*args, **kwargs):
        if args and args[0] == "fail":
            raise RuntimeError("forward failed")
        return ("out", args, kwargs)

    def hook(*args):
        calls.append(args)
        if args[1] and args[1][0] == "hook fails":
            raise ValueError("hook failed")
        return "ignored"

    wrapper = direct.Forward(forward, module, hook)
    assert wrapper.__wrapped__ is forward and wrapper.hook is hook
    assert wrapper(1, 2, scale=3) == ("out", (1, 2), {"scale": 3})
    assert calls == [(module, (1, 2), {"scale": 3}, ("out", (1, 2), {"scale": 3}))]
    assert wrapper() == ("out", (), {}) and calls[-1] == (module, (), {}, ("out", (), {}))
    with pytest.raises(RuntimeError, match="forward failed"):
        wrapper("fail")
    with pytest.raises(ValueError, match="hook failed"):
        wrapper("hook fails")
    assert len(calls) == 3  # the failed forward called no hook
    wrapper.hook = None
    assert wrapper(4) == ("out", (4,), {}) and len(calls) == 3
    with pytest.raises(AttributeError):
        del wrapper.hook
