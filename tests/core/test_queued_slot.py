"""The short way in for a variable that is not gathered (:class:`.direct.QueuedSlot`): a
tensor of the stored shape is copied into pool memory and its write queued, as ``put`` does.
A copy that fails gives its pool memory back (a leak would shrink the budget for good) and
leaves nothing of the failed pass in the store."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.core.direct import QueuedSlot
from layerscope.core.gather import GatherPolicy

from .test_writer import make_recorder

ROLES = ("batch", "token", "hidden")


def test_a_failed_copy_gives_its_memory_back_and_the_store_keeps_the_other_passes(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GatherPolicy(enabled=False))
    rng = np.random.default_rng(0)
    passes = [rng.standard_normal((4, 5, 8), np.float32) for _ in range(4)]

    recorder.begin_pass(4)
    recorder.put("block", "output", passes[0], ROLES, "Block")  # the general way decides
    recorder.end_pass()
    pool = recorder.writer._pool

    def copy_of(values: np.ndarray):
        def copy(memory: np.ndarray) -> None:
            memory[...] = values
        return copy

    def failing(memory: np.ndarray) -> None:
        memory[...] = -1
        raise RuntimeError("the copy out of the model failed")

    recorder.begin_pass(4)
    site_put = recorder.direct_site("block", "output")
    assert site_put is not None and isinstance(site_put._slot, QueuedSlot)
    pending = pool.pending
    with pytest.raises(RuntimeError, match="copy out of the model"):
        site_put.put((4, 5, 8), np.dtype(np.float32), failing)
    assert pool.pending == pending  # nothing held for the failed copy
    recorder.abort_pass()

    for values in passes[1:]:
        recorder.begin_pass(4)
        assert recorder.direct_site("block", "output").put((4, 5, 8), np.dtype(np.float32),
                                                          copy_of(values))
        recorder.end_pass()
    # a shorter pass along the token axis goes the short way too, filled past its length
    recorder.begin_pass(4)
    short = rng.standard_normal((4, 3, 8), np.float32)
    assert recorder.direct_site("block", "output").put((4, 3, 8), np.dtype(np.float32),
                                                      copy_of(short))
    recorder.end_pass()
    recorder.close()

    assert pool.pending == 0
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 5
    stored = ds["block@output"].values
    np.testing.assert_array_equal(stored[:16], np.concatenate(passes))
    np.testing.assert_array_equal(stored[16:, :3], short)
    assert np.isnan(stored[16:, 3:]).all()
