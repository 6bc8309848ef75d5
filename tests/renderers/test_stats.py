"""Distributions: chunked statistics and histograms equal NumPy's; NaN / Inf layers flagged."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.core.chunking import ChunkPolicy
from layerscope.renderers import distributions, histogram, layer_stats

from .synthetic import write_trace


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Three layers over two passes, small chunks; layer 1 holds NaN and Inf."""
    rng = np.random.default_rng(0)
    arrays = {f"layers.{i}": rng.normal(i, 1 + i, size=(6, 10, 16)).astype(np.float32)
              for i in range(3)}
    arrays["layers.1"][2, 3, 4] = np.nan
    arrays["layers.1"][5, 0, :3] = np.inf
    arrays["layers.1"][4, 9, 15] = -np.inf
    batches = [
        [(site, "output", array[rows], ("batch", "token", "hidden"))
         for site, array in arrays.items()]
        for rows in (slice(0, 3), slice(3, 6))
    ]
    options = layerscope.StoreOptions(mode="w", chunks=ChunkPolicy(target_bytes=256,
                                                                  max_bytes=256))
    path = write_trace(tmp_path_factory.mktemp("stats") / "poisoned.zarr", batches, options)
    return layerscope.open_trace(path), arrays


def test_stats_equal_numpy_and_flag_nan_inf(poisoned):
    ds, arrays = poisoned
    assert len(ds["layers.0@output"].data.chunks[2]) > 1  # really chunked
    stats = layer_stats(ds)
    for site, array in arrays.items():
        row = stats.sel(variable=f"{site}@output")
        finite = array[np.isfinite(array)].astype(np.float64)
        assert int(row["count"]) == finite.size
        assert float(row["mean"]) == pytest.approx(finite.mean(), rel=1e-9)
        assert float(row["std"]) == pytest.approx(finite.std(), rel=1e-9)
        assert float(row["min"]) == finite.min() and float(row["max"]) == finite.max()
        assert int(row["nan"]) == int(np.isnan(array).sum())
        assert int(row["inf"]) == int(np.isinf(array).sum())
        assert int(row["size"]) == array.size
    assert list(stats["flagged"].values) == [False, True, False]


def test_histogram_counts_every_element(poisoned):
    ds, arrays = poisoned
    hist = histogram(ds["layers.1@output"], bins=20)
    array = arrays["layers.1"]
    finite = array[np.isfinite(array)]
    expected, _ = np.histogram(finite.astype(np.float64), bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert (hist.nan, hist.inf) == (1, 4)
    assert hist.total == array.size


def test_distribution_figure(poisoned):
    ds, arrays = poisoned
    fig = distributions(ds, bins=10)
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 3
    for ax, (site, array) in zip(panels, arrays.items(), strict=True):
        counts, edges, _ = ax.patches[0].get_data()
        finite = array[np.isfinite(array)].astype(np.float64)
        expected, expected_edges = np.histogram(finite, bins=10,
                                                range=(finite.min(), finite.max()))
        np.testing.assert_array_equal(counts, expected)
        np.testing.assert_allclose(edges, expected_edges)
        assert ax.get_title().startswith(site)
    flagged = panels[1]
    assert "NaN 1  Inf 4" in flagged.get_title()
    assert flagged.title.get_color() == "red"
    assert panels[0].title.get_color() == "black"


def test_minilm_default_distributions_use_the_residual_stream(ds):
    fig = distributions(ds, bins=30)
    titles = [ax.get_title() for ax in fig.axes if ax.patches]
    assert [t.split("\n")[0] for t in titles] == (
        ["embeddings@output"] + [f"encoder.layer.{i}@output" for i in range(6)]
    )
    hist = histogram(ds["encoder.layer.5@output"], bins=30)
    # every value at a real token (token_mask)
    assert hist.total == int(ds["token_mask"].values.sum()) * ds.sizes["hidden"]
