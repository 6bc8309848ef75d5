"""Reductions and token positions (layerscope.core.reduce): how specs are read, which chains a
selection asks for where, and what each step stores, checked against reductions written out
sample by sample in NumPy. The recorder's own NumPy path (for a backend that hands over whole
tensors) runs them here end to end into a store."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.core import CaptureError, Selection, StoreOptions
from layerscope.core._reduce_numpy import OPS
from layerscope.core.format import new_group_attrs
from layerscope.core.info import format_summary, summarize
from layerscope.core.recorder import Recorder
from layerscope.core.reduce import PassMasks, apply_chains
from layerscope.core.reduce_spec import (
    Step,
    default_chains,
    parse_chain,
    parse_step,
    positions_text,
    split_specs,
)
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter
from tests import reduce_reference as ref

ROLES = ("batch", "token", "hidden")


def padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(4, 6, 5) float32 states and a mask: full, right-padded, left-padded, one token."""
    x = np.random.default_rng(seed).standard_normal((4, 6, 5)).astype(np.float32)
    mask = np.ones((4, 6), bool)
    mask[1, 4:] = False
    mask[2, :3] = False
    mask[3, :5] = False
    return x, mask


def run(chain: str, x: np.ndarray, mask: np.ndarray | None, roles=ROLES):
    pieces, skipped = apply_chains([parse_chain(chain)], "output", x, roles, OPS,
                                   PassMasks(x.shape[0], mask))
    return {p.kind: p for p in pieces}, skipped


# -- reading specs -----------------------------------------------------------------------------


def test_steps_are_read_with_their_axis_and_argument():
    assert parse_step("last") == Step("last", None, -1, None)
    assert parse_step("first(query)") == Step("first", "query", 0, 1)
    assert parse_step("slice(token, -4:)") == Step("slice", "token", -4, None)
    assert parse_step("slice(0:3)") == Step("slice", None, 0, 3)
    assert parse_step("topk(neuron,8)") == Step("topk", "neuron", k=8)
    assert parse_step("topk(8)").text("hidden") == "topk(hidden,8)"
    assert parse_step("slice(-8:-4)").length == 4
    assert [s.name for s in parse_chain("last:topk(8)")] == ["last", "topk"]


@pytest.mark.parametrize("text", ["average", "slice(2:)", "slice(-4:2)", "slice(3:1)",
                                  "topk(0)", "topk(hidden)", "mean(token,3)", "last::mean",
                                  "topk(4):last", "last(hidden)", "mean(neuron)"])
def test_a_wrong_spec_is_refused_saying_what_to_write(text):
    with pytest.raises(CaptureError, match=r"e\.g\.|slice|topk|step|token axis"):
        parse_chain(text)


def test_specs_split_at_commas_outside_brackets():
    assert split_specs("output:topk(hidden,8), attention ,output") == [
        "output:topk(hidden,8)", "attention", "output"]


def test_positions_argument_takes_names_and_slices():
    assert positions_text("last") == "last"
    assert positions_text(slice(-4, None)) == "slice(-4:)"
    assert positions_text("0:4") == "slice(0:4)"
    with pytest.raises(CaptureError, match="reduce="):
        positions_text("mean")
    with pytest.raises(CaptureError, match="step"):
        positions_text(slice(0, 4, 2))
    with pytest.raises(CaptureError, match="positions="):
        default_chains(None, ["last"])


def test_selection_chains_by_site_and_kind():
    selection = Selection.of(["layers.*@output:last,output:topk(hidden,8)", "head@output"],
                             exclude=["layers.9"])
    assert selection.wants("output", "layers.1") and not selection.wants("attention", "layers.1")
    assert selection.chains("output.1", "layers.1") == (parse_chain("last"),
                                                         parse_chain("topk(hidden,8)"))
    assert selection.chains("output", "head") == ((),)  # the whole tensor
    assert selection.chains("output", "layers.9") == ()
    assert selection.reduces


def test_positions_and_reduce_apply_to_kinds_named_without_steps():
    selection = Selection.of("layers.*", kinds=["output", "attention:last"], positions="last",
                             reduce=["norm", "topk(4)"])
    assert selection.chains("output", "layers.0") == (parse_chain("last:norm"),
                                                      parse_chain("last:topk(4)"))
    assert selection.chains("attention", "layers.0") == (parse_chain("last"),)
    assert selection.to_json()["positions"] == "last"
    assert Selection.of(selection, reduce="mean").reduce == ("mean",)
    assert not Selection.of("layers.*").reduces
    with pytest.raises(CaptureError, match="unknown reduction"):
        Selection.of("layers.*@output:avg")


# -- what each step stores ---------------------------------------------------------------------


def test_last_and_first_follow_each_samples_mask():
    x, mask = padded_batch()
    pieces, _ = run("last", x, mask)
    stored = pieces["output:last(token)"]
    assert stored.roles == ("batch", "hidden")
    np.testing.assert_array_equal(stored.value, ref.last(x, mask))
    assert stored.attrs["reduction"] == "last(token)" and stored.attrs["token_mask_used"]
    first, _ = run("first", x, mask)
    np.testing.assert_array_equal(first["output:first(token)"].value, ref.first(x, mask))


def test_slices_are_counted_from_the_real_tokens_and_filled_where_a_sample_is_short():
    x, mask = padded_batch()
    for chain, start, stop in (("slice(0:3)", 0, 3), ("slice(-4:)", -4, None),
                               ("slice(-3:-1)", -3, -1), ("slice(1:2)", 1, 2)):
        pieces, _ = run(chain, x, mask)
        (stored,) = pieces.values()
        assert stored.roles == ("batch", "token_slice", "hidden")
        np.testing.assert_array_equal(stored.value, ref.positions(x, mask, start, stop),
                                      err_msg=chain)
    assert np.isnan(run("slice(0:3)", x, mask)[0]["output:slice(token,0:3)"].value[3, 1:]).all()


def test_without_a_mask_every_position_counts():
    x, _ = padded_batch()
    pieces, _ = run("last", x, None)
    np.testing.assert_array_equal(pieces["output:last(token)"].value, x[:, -1])
    assert pieces["output:last(token)"].attrs["token_mask_used"] is False
    sliced, _ = run("slice(0:8)", x, None)  # longer than the pass: filled past it
    assert np.isnan(sliced["output:slice(token,0:8)"].value[:, 6:]).all()


def test_mask_keeps_the_shape_and_fills_padding():
    x, mask = padded_batch()
    pieces, _ = run("mask", x, mask)
    stored = pieces["output:mask(token)"]
    assert stored.roles == ROLES
    np.testing.assert_array_equal(stored.value, ref.masked(x, mask).astype(np.float32))


def test_mean_excludes_padding_and_norm_and_topk_name_their_axes():
    x, mask = padded_batch()
    pieces, _ = run("mean", x, mask)
    np.testing.assert_allclose(pieces["output:mean(token)"].value, ref.mean(x, mask), rtol=1e-6)
    norm, _ = run("norm", x, mask)
    assert norm["output:norm(hidden)"].roles == ("batch", "token")
    np.testing.assert_allclose(norm["output:norm(hidden)"].value, ref.norm(x), rtol=1e-6)
    top, _ = run("last:topk(3)", x, mask)
    values = top["output:last(token):topk(hidden,3)"]
    index = top["output:last(token):topk(hidden,3):index"]
    assert values.roles == index.roles == ("batch", "k")
    expected_values, expected_index = ref.topk(ref.last(x, mask).astype(np.float32), 3)
    np.testing.assert_array_equal(values.value, expected_values)
    np.testing.assert_array_equal(index.value, expected_index)
    assert (values.attrs["topk"], index.attrs["topk"]) == ("values", "index")


def test_mean_of_a_slice_leaves_out_its_filled_positions():
    x, mask = padded_batch()
    pieces, _ = run("slice(-2:):mean", x, mask)
    (stored,) = pieces.values()
    expected = np.nanmean(ref.positions(x, mask, -2, None), axis=1)
    np.testing.assert_allclose(stored.value, expected, rtol=1e-6)


def test_attention_maps_take_the_query_axis():
    maps = np.random.default_rng(1).random((2, 3, 4, 4)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
    pieces, _ = run("last", maps, mask, ("batch", "head", "query", "key"))
    stored = pieces["output:last(query)"]
    assert stored.roles == ("batch", "head", "key")
    np.testing.assert_array_equal(stored.value, maps[:, :, -1])


def test_a_tensor_without_the_axis_is_skipped_with_the_reason():
    pooled = np.ones((2, 8), np.float32)
    pieces, skipped = run("last", pooled, None, ("batch", "hidden"))
    assert pieces == {} and "no token axis" in skipped["output:last"]
    _, short = run("topk(9)", pooled, None, ("batch", "hidden"))
    assert "only 8" in short["output:topk(9)"]
    x, mask = padded_batch()
    _, other = run("last", x, mask[:, :5])  # a cached step: the mask is of another length
    assert "5 positions" in other["output:last"]


def test_integer_tensors_are_filled_with_minus_one():
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    mask = np.array([[1] * 6, [0, 0, 0, 0, 1, 1]], bool)
    pieces, _ = run("slice(0:3)", ids, mask, ("batch", "token"))
    np.testing.assert_array_equal(pieces["output:slice(token,0:3)"].value,
                                  [[0, 1, 2], [10, 11, -1]])


# -- into a store, through the recorder --------------------------------------------------------


def make_recorder(path, selection):
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, selection.to_json())
    group, _ = open_group_for_writing(path, "w-", attrs)
    return Recorder(TraceWriter(group, StoreOptions()), selection, "numpy")


def test_a_backend_that_hands_whole_tensors_still_stores_only_the_reductions(tmp_path):
    """The recorder reduces in NumPy what a backend without reductions hands it; a module
    called twice numbers the kind it reduces; the whole tensor is not stored."""
    x, mask = padded_batch()
    path = tmp_path / "r.zarr"
    recorder = make_recorder(path, Selection.of("block@output:last,output:mean"))
    recorder.begin_pass(4, np.arange(24).reshape(4, 6), attention_mask=mask)
    recorder.put("block", "output", x, ROLES)
    recorder.put("block", "output", x * 2, ROLES)
    recorder.put("block", "output.1", np.ones((4, 5), np.float32), ("batch", "hidden"))
    recorder.close()
    ds = layerscope.open_trace(path)
    assert sorted(layerscope.captured_names(ds)) == [
        "block@output.call1:last(token)", "block@output.call1:mean(token)",
        "block@output:last(token)", "block@output:mean(token)"]
    np.testing.assert_array_equal(ds["block@output:last(token)"].values, ref.last(x, mask))
    np.testing.assert_array_equal(ds["block@output.call1:last(token)"].values,
                                  ref.last(x * 2, mask))
    np.testing.assert_allclose(ds["block@output:mean(token)"].values, ref.mean(x, mask),
                               rtol=1e-6)
    var = ds["block@output:last(token)"]
    assert var.dims == ("batch", "hidden")
    assert var.attrs["kind"] == "output:last(token)"
    assert var.attrs["reduced_kind"] == "output"
    assert var.attrs["reduced_roles"] == list(ROLES)
    summary = summarize(path)
    assert "block@output.1:last" in summary.skipped  # (batch, hidden): no token axis
    listing = format_summary(summary)
    assert "block@output:mean(token)" in listing and "not captured (2)" in listing
