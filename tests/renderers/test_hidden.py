"""Hidden-state views on a real MiniLM trace, checked against NumPy on the stored values."""

from __future__ import annotations

import os

import numpy as np
import pytest

from layerscope import LayerscopeError
from layerscope.renderers import (
    Unembedding,
    block_outputs,
    fit_pca,
    hidden_norms,
    hidden_trajectory,
    layer_similarity,
    logit_lens,
    logit_lens_table,
    similarity_figure,
)

BLOCKS = ["embeddings@output"] + [f"encoder.layer.{i}@output" for i in range(6)]


def _real(ds, sample):
    tokens = [str(t) for t in ds["token_text"].isel(batch=sample).values]
    while tokens[-1] == "[PAD]":
        tokens.pop()
    return tokens


def _stack(ds, sample):
    n = len(_real(ds, sample))
    return np.stack([ds[name].values[sample, :n].astype(np.float64) for name in BLOCKS])


def test_block_outputs_are_the_outermost_site_per_layer(ds):
    stream = block_outputs(ds)
    assert list(stream.names) == BLOCKS
    assert list(stream.labels) == ["embed", "0", "1", "2", "3", "4", "5"]


def test_norms_per_token_and_layer(ds):
    fig = hidden_norms(ds, sample=1)
    ax = fig.axes[0]
    expected = np.linalg.norm(_stack(ds, 1), axis=2).T
    np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-12)
    assert [t.get_text() for t in ax.get_yticklabels()] == _real(ds, 1)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "0", "1", "2", "3", "4", "5"]


def test_pca_is_fitted_on_every_unpadded_vector_of_every_layer(ds):
    stream = block_outputs(ds)
    mean, axes = fit_pca(ds, stream)
    real = np.asarray(ds["token_text"].values.tolist()) != "[PAD]"
    rows = np.concatenate([ds[n].values[real] for n in BLOCKS]).astype(np.float64)
    assert len(rows) == real.sum() * len(BLOCKS) < ds[BLOCKS[0]].shape[0] * ds.sizes["token"] * 7
    np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=1e-9, atol=1e-9)
    _, _, vt = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    for k in range(2):  # the same axes up to sign
        assert abs(float(vt[k] @ axes[:, k])) == pytest.approx(1.0, abs=1e-6)


def test_trajectory_has_one_path_per_token(ds):
    fig = hidden_trajectory(ds, sample=0)
    ax = fig.axes[0]
    tokens = _real(ds, 0)
    assert [t.get_text() for t in ax.texts] == tokens
    assert len(ax.lines) == len(tokens)
    assert all(len(line.get_xdata()) == len(BLOCKS) for line in ax.lines)


def test_similarity_cosine_and_cka(ds):
    stack = _stack(ds, 2)
    cosine, _ = layer_similarity(ds, 2, "cosine")
    unit = stack / np.linalg.norm(stack, axis=2, keepdims=True)
    assert cosine[1, 4] == pytest.approx(float((unit[1] * unit[4]).sum(axis=1).mean()))
    cka, _ = layer_similarity(ds, 2, "cka")
    x = stack[2] - stack[2].mean(axis=0)
    y = stack[5] - stack[5].mean(axis=0)
    expected = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert cka[2, 5] == pytest.approx(expected)
    np.testing.assert_allclose(np.diag(cka), 1.0)
    fig = similarity_figure(ds, 2, "cka")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), cka)


def test_unknown_similarity_is_refused(ds):
    with pytest.raises(LayerscopeError, match="'cka' or 'cosine'"):
        layer_similarity(ds, 0, "euclid")


@pytest.fixture(scope="module")
def tied_unembedding(minilm):
    model, tokenizer = minilm
    matrix = model.embeddings.word_embeddings.weight.detach().numpy()
    vocab = tokenizer.convert_ids_to_tokens(list(range(matrix.shape[0])))
    return Unembedding(matrix, vocab)


def test_logit_lens_reads_the_input_back_at_the_embedding(ds, tied_unembedding):
    sample = 0
    table = logit_lens_table(ds, tied_unembedding, sample, top=3)
    tokens = _real(ds, sample)
    assert table["token_top"].shape == (len(BLOCKS), len(tokens), 3)
    stack = _stack(ds, sample)
    logits = stack @ tied_unembedding.matrix.astype(np.float64).T
    best = np.argmax(logits, axis=2)
    vocab = np.asarray(tied_unembedding.vocab)
    np.testing.assert_array_equal(table["token_top"].values[:, :, 0], vocab[best])
    # tied embeddings map the embedding layer back to (mostly) the input tokens themselves
    same = np.mean(table["token_top"].values[0, :, 0] == np.asarray(tokens))
    assert same >= 0.8
    probs = table["probability"].values
    assert np.all(np.diff(probs, axis=2) <= 0) and np.all(probs <= 1)


def test_logit_lens_figure_shows_the_top_tokens(ds, tied_unembedding):
    fig = logit_lens(ds, tied_unembedding, sample=1)
    table = logit_lens_table(ds, tied_unembedding, 1, top=1)
    words = table["token_top"].values[:, :, 0].T.ravel()
    assert [t.get_text() for t in fig.axes[0].texts] == [w.replace("$", r"\$") for w in words]


def test_unembedding_files(tmp_path, tied_unembedding):
    np.save(tmp_path / "w.npy", tied_unembedding.matrix[:10])
    (tmp_path / "v.txt").write_text("\n".join(tied_unembedding.vocab[:10]) + "\n")
    loaded = Unembedding.load(os.fspath(tmp_path / "w.npy"), os.fspath(tmp_path / "v.txt"))
    assert list(loaded.vocab) == list(tied_unembedding.vocab[:10])
    with pytest.raises(LayerscopeError, match="does not match a vocabulary"):
        Unembedding(tied_unembedding.matrix[:10], ["a"])
