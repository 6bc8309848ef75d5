"""Lazy by construction: drawing one head of one layer reads only that variable's chunks
for that head (and the token labels of that sample), counted at the store."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from zarr.storage import LocalStore

import layerscope
from layerscope.core.chunking import ChunkPolicy
from layerscope.renderers import attention_heatmap, hidden_norms

from .conftest import TEXTS
from .counting import CountingStore, chunk_coords

ATTENTION = "encoder.layer.3.attention.self@attention"


@pytest.fixture(scope="module")
def small_chunks(minilm, tmp_path_factory):
    """MiniLM traced with tiny chunks, so one sample's attention spans many chunks along
    query and head and a careless read would show."""
    model, tokenizer = minilm
    path = tmp_path_factory.mktemp("lazy") / "chunked.zarr"
    options = layerscope.StoreOptions(chunks=ChunkPolicy(target_bytes=512, max_bytes=512))
    layerscope.capture(model, TEXTS, path, capture=["encoder.layer.3.attention.self"],
                       kinds=["attention"], tokenizer=tokenizer, batch_size=3, options=options)
    return path


def _open(path):
    store = CountingStore(LocalStore(os.fspath(path), read_only=True))
    ds = layerscope.open_trace(store)
    store.reset()  # opening reads metadata only; count what drawing reads
    return ds, store


def _chunks_touching(chunks, region):
    """Chunk coordinates of a chunk grid that intersect ``region`` (one slice per dim)."""
    ranges = []
    for size, part in zip(chunks, region, strict=True):
        ranges.append(range(part.start // size, (part.stop - 1) // size + 1))
    return set(itertools.product(*ranges))


def test_opening_reads_no_array_data(small_chunks):
    store = CountingStore(LocalStore(os.fspath(small_chunks), read_only=True))
    layerscope.open_trace(store)
    assert store.chunk_reads() == {}


def test_one_head_reads_only_that_heads_chunks(small_chunks):
    ds, store = _open(small_chunks)
    sample, head = 1, 5
    chunks = ds[ATTENTION].encoding["chunks"]
    assert chunks[1] < ds.sizes["head"]  # really split: a head never shares a chunk with another
    tokens = [str(t) for t in ds["token_text"].isel(batch=sample).values]
    store.reset()
    attention_heatmap(ds, layer=3, head=head, sample=sample)
    real = len(tokens) - sum(t == "[PAD]" for t in tokens)
    expected = _chunks_touching(
        chunks, (slice(sample, sample + 1), slice(head, head + 1), slice(0, real), slice(0, real))
    )
    reads = store.chunk_reads()
    assert set(reads) == {ATTENTION, "token_text", "token_mask"}
    assert reads[ATTENTION] == expected
    assert all(count == 1 for key, count in store.reads.items() if chunk_coords(key))
    on_disk = sum(
        os.path.getsize(os.path.join(small_chunks, ATTENTION, ".".join(["c", *map(str, coords)])))
        for coords in expected
    )
    attention_bytes = sum(n for key, n in store.nbytes.items()
                          if key.startswith(ATTENTION + "/") and chunk_coords(key))
    assert attention_bytes == on_disk
    # what was read is a small part of the variable
    total = sum(1 for name in os.listdir(os.path.join(small_chunks, ATTENTION))
                if name.startswith("c."))
    assert len(expected) < total / 5  # 1 of 3 samples, 1 of 2 head groups


def test_norms_read_only_the_block_outputs_of_that_sample(minilm_trace):
    ds, store = _open(minilm_trace)
    sample = 2
    hidden_norms(ds, sample=sample)
    reads = store.chunk_reads()
    blocks = {"embeddings@output"} | {f"encoder.layer.{i}@output" for i in range(6)}
    assert set(reads) - {"token_text", "token_mask"} == blocks
    for name in blocks:
        chunks = ds[name].encoding["chunks"]
        batch_chunk = sample // chunks[0]
        assert {coords[0] for coords in reads[name]} == {batch_chunk}


def test_values_through_the_wrapper_are_the_stored_values(small_chunks):
    ds, _ = _open(small_chunks)
    fig = attention_heatmap(ds, layer=3, head=5, sample=1)
    direct = layerscope.open_trace(small_chunks)[ATTENTION].values[1, 5]
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(shown, direct[: shown.shape[0], : shown.shape[1]])
