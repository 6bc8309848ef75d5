"""Degenerate maps (one cell, or constant): every view gets a color range with vmin < vmax,
and writes the map's value on it, instead of a panel colored by accident."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.renderers import (
    attention_grid,
    attention_heatmap,
    channel_grid,
    head_summary_figure,
    hidden_norms,
    neuron_heatmap,
    similarity_figure,
)

from .synthetic import degenerate_trace


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return layerscope.open_trace(degenerate_trace(tmp_path_factory.mktemp("tiny") / "t.zarr"))


def _value_panels(fig):
    return [(ax, image) for ax in fig.axes for image in ax.images]


def _written(ax):
    return {t.get_text() for t in ax.texts}


@pytest.mark.parametrize("draw, value", [
    (lambda ds: attention_heatmap(ds), "1"),
    (lambda ds: attention_grid(ds), "1"),
    (lambda ds: hidden_norms(ds), "1"),  # |(0.5, 0.5, 0.5, 0.5)| at every layer
    (lambda ds: similarity_figure(ds, method="cosine"), "1"),
    (lambda ds: neuron_heatmap(ds, neurons=[0]), "2"),
])
def test_every_panel_has_a_range_and_its_value(tiny, draw, value):
    panels = _value_panels(draw(tiny))
    assert panels
    for ax, image in panels:
        assert image.norm.vmin < image.norm.vmax
        stored = np.asarray(image.get_array(), dtype=np.float64)
        assert np.ptp(stored) == 0
        assert value in _written(ax)


def test_the_head_summary_of_a_single_token_has_ranges_and_values(tiny):
    fig = head_summary_figure(tiny)
    for ax, image in _value_panels(fig):
        assert image.norm.vmin < image.norm.vmax
        data = np.asarray(image.get_array(), dtype=np.float64)
        finite = data[np.isfinite(data)]
        assert f"{finite[0]:.3g}" in _written(ax)


def test_pooled_channel_maps_share_one_range_and_show_their_values(tiny):
    """1x1 maps have no range of their own: colored on the range of all drawn, so that a
    larger value reads brighter, each with its value written."""
    fig = channel_grid(tiny, "pool@output")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert sorted(panels) == ["channel 0", "channel 1", "channel 2"]
    for channel, value in enumerate((0.25, 0.5, 1.0)):
        ax = panels[f"channel {channel}"]
        image = ax.images[0]
        assert (image.norm.vmin, image.norm.vmax) == (0.25, 1.0)
        assert float(image.get_array()[0, 0]) == value
        assert f"{value:.3g}" in _written(ax)
