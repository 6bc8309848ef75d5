"""Views of a trace whose passes have different token lengths (left and right padding):
attention maps are drawn over each sample's own tokens, summaries and statistics leave out
padding and the fill values past a shorter pass's length, and ``layerscope info`` gives the
per-sample token lengths."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.core import Selection, StoreOptions
from layerscope.core.format import new_group_attrs
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter
from layerscope.renderers import attention_heatmap, head_summary, layer_stats

HEADS = 2
#: per pass: the attention mask of each sample (left padding, then right padding)
MASKS = (np.array([[0, 1, 1, 1], [1, 1, 1, 1]]),
         np.array([[1] * 9, [1] * 6 + [0] * 3]))


def _attention(mask: np.ndarray, seed: int) -> np.ndarray:
    """Softmax maps over each sample's real keys (zero on padding keys), as a model gives."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((len(mask), HEADS, mask.shape[1], mask.shape[1]))
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("varlen") / "t.zarr"
    attrs = new_group_attrs("numpy", np.__version__, {"class": "synthetic"},
                            Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode="w")), Selection(), "numpy",
                        lambda ids: [f"t{i}" for i in ids])
    maps = []
    for seed, mask in enumerate(MASKS):
        maps.append(_attention(mask, seed))
        ids = np.arange(mask.size).reshape(mask.shape)
        recorder.begin_pass(len(mask), ids, attention_mask=mask)
        recorder.put("layers.0.attn", "attention", maps[-1], ("batch", "head", "query", "key"),
                     "Synthetic", attrs={"attention": "self"})
        recorder.end_pass()
    recorder.close()
    return path, maps


def _samples(maps):
    """(pass map, row in it, mask) of every sample, in the store's order."""
    return [(map_, row, mask[row]) for map_, mask in zip(maps, MASKS, strict=True)
            for row in range(len(mask))]


def test_the_heatmap_draws_a_sample_over_its_own_tokens(trace):
    path, maps = trace
    ds = layerscope.open_trace(path)
    assert ds.sizes["query"] == 9
    for sample, (map_, row, mask) in enumerate(_samples(maps)):
        fig = attention_heatmap(ds, layer=0, head=1, sample=sample)
        shown = np.asarray(fig.axes[0].images[0].get_array())
        real = np.flatnonzero(mask)
        assert shown.shape == (len(real), len(real))  # no padding rows, no fill rows
        np.testing.assert_array_equal(shown, map_[row, 1][np.ix_(real, real)])


def test_summaries_and_stats_skip_padding_and_fill(trace):
    path, maps = trace
    ds = layerscope.open_trace(path)
    summary = head_summary(ds)
    assert np.isfinite(summary["entropy"].values).all()
    stats = layer_stats(ds).sel(variable="layers.0.attn@attention")
    real = [map_[row][:, mask > 0][:, :, mask > 0] for map_, row, mask in _samples(maps)]
    values = np.concatenate([r.ravel() for r in real]).astype(np.float64)
    assert int(stats["nan"]) == 0 and not bool(stats["flagged"])
    assert int(stats["count"]) == values.size
    assert float(stats["mean"]) == pytest.approx(values.mean(), rel=1e-9)


def test_info_shows_per_sample_token_lengths(trace, capsys):
    from layerscope.cli import main

    path, _ = trace
    assert main(["info", str(path)]) == 0
    counts = [int(mask.sum()) for masks in MASKS for mask in masks]
    assert f"tokens     {min(counts)}..{max(counts)} per sample" in capsys.readouterr().out
