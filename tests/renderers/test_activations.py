"""Activation views: CNN channel maps over the image, MLP neuron x token heatmaps, top tokens."""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import layerscope
from layerscope import LayerscopeError
from layerscope.renderers import (
    channel_grid,
    conv_variables,
    mlp_variables,
    neuron_heatmap,
    top_tokens,
    top_tokens_figure,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 3, padding=1)), ("relu1", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("conv2", nn.Conv2d(6, 4, 3, padding=1)),
    ])).eval()
    images = torch.rand(5, 1, 8, 8)
    path = tmp_path_factory.mktemp("cnn") / "cnn.zarr"
    with torch.no_grad():
        layerscope.capture(model, images, path, kinds=["input", "output"])
    return path


@pytest.fixture(scope="module")
def cnn_trace(cnn_path):
    return layerscope.open_trace(cnn_path)


def test_channels_from_the_cli(cnn_path, tmp_path, capsys):
    from layerscope.cli import main

    path = cnn_path
    out = tmp_path / "channels.svg"
    assert main(["render", "activations", str(path), "--view", "channels", "--variable",
                 "conv1@output", "--channels", "0", "2", "-o", str(out)]) == 0
    svg = out.read_text()
    assert "channel 0" in svg and "channel 2" in svg and "channel 1<" not in svg


def test_conv_variables(cnn_trace):
    names = conv_variables(cnn_trace)
    assert names == ["conv1@output", "relu1@output", "pool@output", "conv2@output",
                     "root@output"]


def test_channel_grid_draws_each_channel_over_the_image(cnn_trace):
    ds = cnn_trace
    sample = 3
    fig = channel_grid(ds, "relu1@output", sample=sample)
    panels = [ax for ax in fig.axes if ax.images]
    stored = ds["relu1@output"].values[sample]
    image = ds["conv1@input"].values[sample].mean(axis=0)
    order = sorted(np.argsort(-stored.mean(axis=(1, 2)))[:16].tolist())
    assert [ax.get_title() for ax in panels] == [f"channel {c}" for c in order]
    for ax, channel in zip(panels, order, strict=True):
        background, overlay = ax.images
        np.testing.assert_allclose(background.get_array(), image, rtol=1e-6)
        np.testing.assert_array_equal(overlay.get_array(), stored[channel])
    assert "over the input image" in fig.texts[0].get_text()


def test_channel_grid_of_a_smaller_map_spans_the_image(cnn_trace):
    fig = channel_grid(cnn_trace, "conv2@output", channels=[1, 3])
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["channel 1", "channel 3"]
    background, overlay = panels[0].images
    assert overlay.get_array().shape == (4, 4)
    assert overlay.get_extent() == background.get_extent()


def test_channel_out_of_range(cnn_trace):
    with pytest.raises(LayerscopeError, match="channel 9 is out of range"):
        channel_grid(cnn_trace, "conv2@output", channels=[9])


def test_no_convolutions_in_a_transformer(ds):
    with pytest.raises(LayerscopeError, match="no convolution output"):
        channel_grid(ds)


def test_neuron_heatmap_top_neurons(ds):
    name = "encoder.layer.2.intermediate@output"
    assert name in mlp_variables(ds)
    fig = neuron_heatmap(ds, layer=2, sample=1, max_neurons=20)
    ax = fig.axes[0]
    assert name in ax.get_title() and "top 20 of 1536" in ax.get_title()
    tokens = [str(t) for t in ds["token_text"].isel(batch=1).values if str(t) != "[PAD]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    values = ds[name].values[1, : len(tokens)].T
    top = sorted(np.argsort(-np.abs(values).max(axis=1))[:20].tolist())
    assert [int(t.get_text()) for t in ax.get_yticklabels()] == top
    np.testing.assert_array_equal(ax.images[0].get_array(), values[top])


def test_top_tokens_across_the_trace(ds):
    name = "encoder.layer.4.intermediate@output"
    table = top_tokens(ds, name, k=3)
    values = ds[name].values.astype(np.float64)
    text = np.asarray(ds["token_text"].values.tolist(), dtype=str)
    values[text == "[PAD]"] = -np.inf
    flat = values.reshape(-1, values.shape[-1])
    for neuron in (0, 77, 1535):
        order = np.argsort(-flat[:, neuron], kind="stable")[:3]
        np.testing.assert_allclose(table.value.sel(neuron=neuron), flat[order, neuron])
        samples, positions = np.divmod(order, values.shape[1])
        assert list(table.token.sel(neuron=neuron).values) == [
            text[s, p] for s, p in zip(samples, positions, strict=True)
        ]
    fig = top_tokens_figure(ds, name, k=3, neurons=[77])
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert cells[0].startswith(str(table.token.sel(neuron=77, rank=0).values))


def test_digits_example_trains_and_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("digits_cnn", ROOT / "examples/digits_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path, epochs=2)
    assert result["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert result["picture"].read_bytes().startswith(b"\x89PNG")
    ds = layerscope.open_trace(result["trace"])
    assert ds["relu1@output"].sizes["batch"] == 64
