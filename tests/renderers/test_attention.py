"""Attention views on a real MiniLM trace: labels, values and panel counts."""

from __future__ import annotations

import numpy as np
import pytest

from layerscope import LayerscopeError
from layerscope.renderers import (
    ViewOptions,
    attention_grid,
    attention_heatmap,
    attention_variables,
    head_summary,
    head_view,
    save,
    select_attention,
)


def _tokens(ds, sample):
    tokens = [str(t) for t in ds["token_text"].isel(batch=sample).values]
    while tokens[-1] == "[PAD]":
        tokens.pop()
    return tokens


def test_attention_variables_follow_layers(ds):
    names = attention_variables(ds)
    assert names == [f"encoder.layer.{i}.attention.self@attention" for i in range(6)]
    assert select_attention(ds, layer=4) == names[4]
    assert select_attention(ds) == names[0]


def test_heatmap_labels_are_the_tokens_and_pixels_are_the_head(ds):
    sample, layer, head = 0, 3, 5
    fig = attention_heatmap(ds, layer=layer, head=head, sample=sample)
    ax = fig.axes[0]
    tokens = _tokens(ds, sample)
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    expected = ds[f"encoder.layer.{layer}.attention.self@attention"].values[sample, head]
    n = len(tokens)
    np.testing.assert_array_equal(ax.images[0].get_array(), expected[:n, :n])


def test_heatmap_by_variable_name(ds):
    name = "encoder.layer.1.attention.self@attention"
    fig = attention_heatmap(ds, variable=name, head=2, sample=1)
    assert name in fig.axes[0].get_title()
    expected = ds[name].values[1, 2][: len(_tokens(ds, 1)), : len(_tokens(ds, 1))]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), expected)


def test_window_and_pooling_are_said(ds):
    fig = attention_heatmap(ds, layer=0, head=0, options=ViewOptions(window=(2, 8), max_cells=3))
    ax = fig.axes[0]
    title = ax.get_title()
    assert "tokens 2..7" in title and "max-pooled 2x2" in title
    block = ds["encoder.layer.0.attention.self@attention"].values[0, 0, 2:8, 2:8]
    pooled = block.reshape(3, 2, 3, 2).max(axis=(1, 3))
    np.testing.assert_array_equal(ax.images[0].get_array(), pooled)


def test_long_sequences_label_every_kth_token_with_its_position(ds):
    fig = attention_heatmap(ds, sample=1, options=ViewOptions(max_labels=4))
    tokens = _tokens(ds, 1)
    step = -(-len(tokens) // 2)  # over 4 tokens: every k-th, at most 4 // 2 labels
    expected = [f"{i}:{tokens[i]}" for i in range(0, len(tokens), step)]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == expected
    assert list(fig.axes[0].get_xticks()) == list(range(0, len(tokens), step))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"head": 12}, "head 12 is out of range"), ({"layer": 7}, "this trace has layers"),
     ({"variable": "nothing@attention"}, "no variable"), ({"sample": 3}, "sample 3")],
)
def test_bad_input_says_what_to_do(ds, kwargs, message):
    with pytest.raises(LayerscopeError, match=message):
        attention_heatmap(ds, **kwargs)


def test_grid_has_layers_by_heads_panels(ds):
    fig = attention_grid(ds, sample=1)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 6 * 12
    assert images[0].get_title() == "head 0"
    # an encoder-only model has no stacks: its blocks are plain layers
    assert images[12].get_ylabel() == "layer 1"
    n = len(_tokens(ds, 1))
    expected = ds["encoder.layer.5.attention.self@attention"].values[1, 11, :n, :n]
    np.testing.assert_array_equal(images[-1].images[0].get_array(), expected)


def test_head_view_draws_one_line_per_visible_weight(ds):
    fig = head_view(ds, layer=2, sample=0, heads=[0, 3])
    ax = fig.axes[0]
    tokens = _tokens(ds, 0)
    texts = [t.get_text() for t in ax.texts]
    assert texts == tokens + tokens  # queries on the left, then keys on the right
    weights = ds["encoder.layer.2.attention.self@attention"].values[0, [0, 3]]
    n = len(tokens)
    visible = int((weights[:, :n, :n] >= 0.02).sum())
    assert len([line for line in ax.lines if len(line.get_xdata())]) == visible


def test_head_summary_matches_numpy(ds):
    summary = head_summary(ds)
    assert summary.entropy.shape == (6, 12)
    assert list(summary["label"].values) == [f"layer {i}" for i in range(6)]
    name, head = "encoder.layer.2.attention.self@attention", 7
    weights = ds[name].values
    entropy, distance, special, rows = 0.0, 0.0, 0.0, 0
    for sample in range(ds.sizes["batch"]):
        tokens = _tokens(ds, sample)
        n = len(tokens)
        a = weights[sample, head, :n, :n].astype(np.float64)
        entropy += float(-(a * np.log(np.where(a > 0, a, 1))).sum())
        gap = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
        distance += float((a * gap).sum())
        mask = np.array([t in ("[CLS]", "[SEP]") for t in tokens])
        special += float(a[:, mask].sum())
        rows += n
    assert summary.entropy.sel(variable=name, head=head) == pytest.approx(entropy / rows)
    assert summary.distance.sel(variable=name, head=head) == pytest.approx(distance / rows)
    assert summary.special.sel(variable=name, head=head) == pytest.approx(special / rows)


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"),
                                           (".pdf", b"%PDF")])
def test_save_by_suffix(ds, tmp_path, suffix, magic):
    path = save(attention_heatmap(ds), tmp_path / f"head{suffix}")
    assert path.read_bytes().startswith(magic)


def test_save_refuses_unknown_format(ds, tmp_path):
    with pytest.raises(LayerscopeError, match=".png, .svg or .pdf"):
        save(attention_heatmap(ds), tmp_path / "head.gif")


def test_figures_display_inline(ds):
    assert attention_heatmap(ds)._repr_png_().startswith(b"\x89PNG")


def test_grid_says_when_heads_are_cut_and_maps_pooled(ds):
    fig = attention_grid(ds, sample=0, options=ViewOptions(max_cells=4), max_heads=5)
    title = fig.texts[0].get_text()
    assert "first 5 of 12 heads" in title and "max-pooled 3x3" in title
    assert len([ax for ax in fig.axes if ax.images]) == 6 * 5


def test_drawing_imports_no_framework(minilm_trace, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, layerscope\n"
        "from layerscope.renderers import attention_heatmap, hidden_norms, save\n"
        f"ds = layerscope.open_trace({str(minilm_trace)!r})\n"
        f"save(attention_heatmap(ds), {str(tmp_path / 'a.png')!r})\n"
        f"save(hidden_norms(ds), {str(tmp_path / 'b.png')!r})\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'keras') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()
