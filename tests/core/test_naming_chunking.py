from __future__ import annotations

import pytest

from layerscope.core import CaptureError, Selection
from layerscope.core.chunking import MB, ChunkPolicy, chunk_shape
from layerscope.core.naming import DimRegistry, layer_index, parse_variable_name, variable_name


def test_variable_names_round_trip():
    name = variable_name("encoder.layer.3.attention.self", "attention")
    assert name == "encoder.layer.3.attention.self@attention"
    parsed = parse_variable_name(name)
    assert (parsed.site, parsed.kind) == ("encoder.layer.3.attention.self", "attention")
    assert variable_name("", "output") == "root@output"
    with pytest.raises(CaptureError):
        variable_name("a/b", "output")
    assert layer_index("encoder.layer.3.output") == 3 and layer_index("pooler") is None


def test_dim_registry_keeps_one_size_per_name():
    dims = DimRegistry()
    assert dims.resolve(("batch", "token", "hidden"), (2, 7, 384)) == ("batch", "token", "hidden")
    assert dims.resolve(("batch", "hidden"), (2, 2)) == ("batch", "hidden_2")
    # the same role twice in one tensor (a square map) gets two names of one size
    assert dims.resolve(("batch", "hidden", "hidden"), (2, 384, 384)) == \
        ("batch", "hidden", "hidden_384")
    assert dims.resolve(("batch", "hidden"), (2, 2)) == ("batch", "hidden_2")
    assert dims.sizes == {"token": 7, "hidden": 384, "hidden_2": 2, "hidden_384": 384}


def test_selection_globs_and_kinds():
    selection = Selection.of(["encoder.layer.*.attention*"], kinds=["attention"],
                             exclude=["*.output"])
    assert selection.matches("encoder.layer.3.attention.self")
    assert not selection.matches("encoder.layer.3.attention.output")
    assert not selection.matches("embeddings")
    assert selection.wants("attention") and not selection.wants("output.1")
    assert Selection.of(None).matches("anything")


def test_chunks_hold_whole_samples_within_the_band():
    # MiniLM attention, batch 8 x 128 tokens: whole samples, one batch per chunk
    chunks = chunk_shape((0, 12, 128, 128), ("batch", "head", "query", "key"), 4, 8)
    assert chunks == (8, 12, 128, 128)
    # long attention maps are split by head first, then along query, to stay under the maximum
    long = chunk_shape((0, 16, 2048, 2048), ("batch", "head", "query", "key"), 4, 8)
    assert long == (1, 1, 2048, 2048)
    big = chunk_shape((0, 16, 4096, 4096), ("batch", "head", "query", "key"), 4, 8)
    assert big == (1, 1, 1024, 4096)
    assert 4 * big[1] * big[2] * big[3] <= ChunkPolicy().max_bytes
    # tiny tensors: one chunk per appended batch
    assert chunk_shape((0, 3), ("batch", "hidden"), 4, 5) == (5, 3)
    assert ChunkPolicy().target_bytes <= 16 * MB


def test_selection_patterns_can_name_their_kinds():
    selection = Selection.of(["encoder.layer.[0-9]@output", "*.attention.self@attention"])
    assert selection.wants("output", "encoder.layer.3")
    assert not selection.wants("attention", "encoder.layer.3")
    assert selection.wants("attention", "encoder.layer.3.attention.self")
    assert not selection.wants("output", "encoder.layer.3.attention.self")
    assert not selection.matches("encoder.layer.3.output")
    assert selection.wants("attention") and not selection.wants("input")
