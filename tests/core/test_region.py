"""Pieces of a batch (core/region.py): a variable written a few positions at a time, as a
traced generate() writes it; a discarded batch's pieces never show; unnamed axes of
unrelated tensors do not share a length."""

from __future__ import annotations

import time

import numpy as np

import layerscope
from layerscope.core.region import Region

from .test_writer import make_recorder

ROLES = ("batch", "head", "query", "key")


def attention(seed: int, size: int = 3, length: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).random((size, 2, length, length), np.float32)


def put_in_pieces(recorder, data: np.ndarray, rows: int, skip: tuple[int, ...] = ()) -> None:
    """``data`` (batch, head, query, key) in pieces of ``rows`` queries, all keys; the pieces
    starting at a position in ``skip`` hold fill values (chunks must all be written)."""
    length = data.shape[2]
    for at in range(0, length, rows):
        piece = data[:, :, at:at + rows]
        if at in skip:
            piece = np.full_like(piece, np.nan)
        recorder.put("layer.0", "attention", piece, ROLES,
                     region=Region(data.shape[1:], (0, at, 0), {1: rows, 2: length}),
                     call_index=0)


def test_pieces_read_back_as_the_whole_and_unwritten_positions_as_fill(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    first, second = attention(1), attention(2)
    recorder.begin_pass(3)
    put_in_pieces(recorder, first, rows=4)
    recorder.end_pass()
    recorder.begin_pass(3)
    put_in_pieces(recorder, second, rows=4, skip=(4,))  # queries 4-7 not computed
    recorder.end_pass()
    recorder.close()
    ds = layerscope.open_trace(path)
    var = ds["layer.0@attention"]
    assert var.dims == ROLES and var.encoding["chunks"] == (3, 2, 4, 10)
    values = var.values
    assert values[:3].tobytes() == first.tobytes()
    np.testing.assert_array_equal(values[3:, :, :4], second[:, :, :4])
    np.testing.assert_array_equal(values[3:, :, 8:], second[:, :, 8:])
    assert np.isnan(values[3:, :, 4:8]).all()
    assert layerscope.verify(path).ok


def test_a_longer_pass_in_pieces_grows_the_axes_and_fills_the_shorter(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    short, long = attention(1, length=6), attention(2, length=13)
    for data in (short, long):
        recorder.begin_pass(3)
        put_in_pieces(recorder, data, rows=4)
        recorder.end_pass()
    recorder.close()
    values = layerscope.open_trace(path)["layer.0@attention"].values
    assert values.shape == (6, 2, 13, 13)
    np.testing.assert_array_equal(values[:3, :, :6, :6], short)
    assert np.isnan(values[:3, :, 6:]).all() and np.isnan(values[:3, :, :, 6:]).all()
    np.testing.assert_array_equal(values[3:], long)


def test_a_discarded_batch_written_in_pieces_never_shows(tmp_path):
    """A pass that fails after some pieces were written is discarded; the next batch, at the
    same rows, is shorter: the positions past it, which the discarded one wrote, read as
    fill."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    kept, dropped, last = attention(1), attention(2), attention(3, length=6)
    recorder.begin_pass(3)
    put_in_pieces(recorder, kept, rows=2)
    recorder.end_pass()
    recorder.begin_pass(3)
    put_in_pieces(recorder, dropped, rows=2)
    last_piece = path / "layer.0@attention" / "c.1.0.4.0"  # rows 3-5, queries 8-9
    deadline = time.monotonic() + 30
    while not last_piece.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the workers write the pieces in the background
    assert last_piece.exists()
    recorder.abort_pass()
    recorder.begin_pass(3)
    put_in_pieces(recorder, last, rows=2)
    recorder.end_pass()
    recorder.close()
    ds = layerscope.open_trace(path)
    values = ds["layer.0@attention"].values
    assert ds.attrs["committed_samples"] == 6
    np.testing.assert_array_equal(values[:3], kept)
    np.testing.assert_array_equal(values[3:, :, :6, :6], last)
    assert np.isnan(values[3:, :, 6:]).all()  # the discarded batch wrote these
    assert np.isnan(values[3:, :, :, 6:]).all()
    assert layerscope.verify(path).ok


def test_unnamed_axes_of_unrelated_tensors_keep_their_own_lengths(tmp_path):
    """A tensor first seen in a later pass whose unnamed axis has another size than the
    stored one gets its own name, rather than setting the length for the pass (which the
    tensor stored under that name would then fail)."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    logits = np.random.default_rng(0).random((2, 5, 128), np.float32)
    other = np.random.default_rng(1).random((2, 5, 24), np.float32)
    recorder.begin_pass(2)
    recorder.put("lm_head", "output", logits, ("batch", "token", "axis2"))
    recorder.end_pass()
    recorder.begin_pass(2)
    recorder.put("embed", "input", other, ("batch", "token", "axis2"))
    recorder.put("lm_head", "output", logits, ("batch", "token", "axis2"))
    recorder.end_pass()
    recorder.close()
    ds = layerscope.open_trace(path)
    assert ds["lm_head@output"].dims == ("batch", "token", "axis2")
    assert ds["embed@input"].dims == ("batch", "token", "axis2_24")
    np.testing.assert_array_equal(ds["lm_head@output"].values, np.concatenate([logits] * 2))
    np.testing.assert_array_equal(ds["embed@input"].values[2:], other)
