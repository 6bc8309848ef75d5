"""Views of an encoder-decoder trace as the format describes it (built through the
Recorder): cross-attention drawn whole (decoder tokens x encoder tokens), each axis labeled by
its own tokens, stack / layer / self-or-cross named, ambiguous choices refused."""

from __future__ import annotations

import numpy as np
import pytest

import layerscope
from layerscope.cli import main
from layerscope.core.info import format_summary, summarize
from layerscope.renderers import (
    RenderError,
    ReportOptions,
    attention_grid,
    attention_heatmap,
    head_summary,
    head_view,
    hidden_norms,
    neuron_heatmap,
    report_html,
    select_attention,
    top_tokens,
)

from .synthetic import DECODER_TOKENS, ENCODER_TOKENS, HEADS, seq2seq_trace

ENC = [f"e{i}" for i in range(ENCODER_TOKENS)]
DEC = [f"d{i}" for i in range(DECODER_TOKENS)]


@pytest.fixture(scope="module")
def s2s_path(tmp_path_factory):
    return seq2seq_trace(tmp_path_factory.mktemp("s2s") / "s2s.zarr")


@pytest.fixture()
def s2s(s2s_path):
    return layerscope.open_trace(s2s_path)


def _ticks(ax, which):
    labels = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def test_cross_attention_is_drawn_whole_with_each_axis_its_own_tokens(s2s):
    fig = attention_heatmap(s2s, layer=1, head=1, sample=1, stack="decoder", attention="cross")
    ax = fig.axes[0]
    name = "decoder.block.1.cross_attn@attention"
    np.testing.assert_array_equal(ax.images[0].get_array(), s2s[name].values[1, 1])
    assert ax.images[0].get_extent() == [-0.5, ENCODER_TOKENS - 0.5, DECODER_TOKENS - 0.5, -0.5]
    assert _ticks(ax, "x") == ENC and _ticks(ax, "y") == DEC
    assert "decoder 1 cross" in ax.get_title() and name in ax.get_title()
    assert ax.get_ylabel() == "query (decoder tokens)" and ax.get_xlabel() == "key"


def test_decoder_self_attention_is_labeled_by_decoder_tokens(s2s):
    ax = attention_heatmap(s2s, layer=0, stack="decoder", attention="self").axes[0]
    assert _ticks(ax, "x") == DEC and _ticks(ax, "y") == DEC
    assert "decoder 0 self" in ax.get_title()


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 0}, "layer 0 is in 2 stacks (encoder, decoder); pass --stack encoder or "
                   "--stack decoder"),
    ({"layer": 1, "stack": "decoder"}, "decoder 1 has both self- and cross-attention; pass "
                                       "--attention self or --attention cross"),
    ({"layer": 5, "stack": "decoder"}, "no attention map at layer 5 of stack 'decoder'"),
    ({"attention": "cross", "stack": "encoder"}, "no cross-attention in stack 'encoder'"),
])
def test_ambiguous_or_missing_choices_are_refused_in_one_line(s2s, kwargs, message):
    with pytest.raises(RenderError) as error:
        select_attention(s2s, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_choices_pick_the_named_map(s2s):
    assert select_attention(s2s, layer=0, stack="encoder") == "encoder.block.0.attn@attention"
    assert (select_attention(s2s, layer=1, stack="decoder", attention="self")
            == "decoder.block.1.self_attn@attention")
    assert select_attention(s2s) == "encoder.block.0.attn@attention"  # the first executed


def test_grid_rows_name_stack_layer_and_kind_and_draw_each_map_whole(s2s):
    fig = attention_grid(s2s, sample=0)
    rows = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in rows] == [
        "encoder 0", "encoder 1", "decoder 0 self", "decoder 0 cross",
        "decoder 1 self", "decoder 1 cross"]
    cross = rows[3]
    assert cross.images[0].get_array().shape == (DECODER_TOKENS, ENCODER_TOKENS)
    assert cross.images[0].get_extent() == [-0.5, ENCODER_TOKENS - 0.5,
                                            DECODER_TOKENS - 0.5, -0.5]
    only_cross = attention_grid(s2s, attention="cross")
    assert [ax.get_ylabel() for ax in only_cross.axes if ax.get_ylabel()] == [
        "decoder 0 cross", "decoder 1 cross"]


def test_head_view_puts_decoder_tokens_left_and_encoder_tokens_right(s2s):
    ax = head_view(s2s, layer=0, stack="decoder", attention="cross", heads=[0, 1]).axes[0]
    left = [t.get_text() for t in ax.texts if t.get_position()[0] < 0.5]
    right = [t.get_text() for t in ax.texts if t.get_position()[0] > 0.5]
    assert left == DEC and right == ENC


def test_summary_has_one_row_per_map_and_no_distance_across_stacks(s2s):
    summary = head_summary(s2s)
    assert list(summary["label"].values) == [
        "encoder 0", "encoder 1", "decoder 0 self", "decoder 0 cross",
        "decoder 1 self", "decoder 1 cross"]
    cross = "decoder.block.0.cross_attn@attention"
    assert np.isnan(summary.distance.sel(variable=cross)).all()
    weights = s2s[cross].values.astype(np.float64)  # (batch, head, dec, enc)
    entropy = -(weights * np.log(weights)).sum(-1).sum(-1).sum(0) / (2 * DECODER_TOKENS)
    np.testing.assert_allclose(summary.entropy.sel(variable=cross), entropy, rtol=1e-6)
    assert summary.sizes["head"] == HEADS


def test_hidden_views_need_a_stack_and_label_the_decoder_by_its_tokens(s2s):
    with pytest.raises(RenderError, match="pass --stack encoder or --stack decoder"):
        hidden_norms(s2s)
    ax = hidden_norms(s2s, stack="decoder").axes[0]
    assert _ticks(ax, "y") == DEC and _ticks(ax, "x") == ["0", "1"]
    assert "of the decoder" in ax.get_title()
    assert _ticks(hidden_norms(s2s, stack="encoder").axes[0], "y") == ENC


def test_activations_by_layer_need_a_stack_and_use_the_stacks_tokens(s2s):
    with pytest.raises(RenderError, match="layer 1 is in 2 stacks"):
        neuron_heatmap(s2s, layer=1)
    ax = neuron_heatmap(s2s, layer=1, stack="decoder").axes[0]
    assert _ticks(ax, "x") == DEC and "decoder.block.1.mlp@output" in ax.get_title()
    table = top_tokens(s2s, layer=1, stack="decoder", k=2)
    assert set(np.unique(table["token"].values)) <= set(DEC)


def test_cli_selects_by_stack_and_attention_and_refuses_in_one_line(s2s_path, tmp_path, capsys):
    out = tmp_path / "cross.png"
    assert main(["render", "attention", str(s2s_path), "--layer", "1", "--stack", "decoder",
                 "--attention", "cross", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert main(["render", "attention", str(s2s_path), "--layer", "0",
                 "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pass --stack encoder or --stack decoder" in err and err.count("\n") == 1
    assert main(["render", "hidden", str(s2s_path), "--stack", "decoder",
                 "-o", str(tmp_path / "n.png")]) == 0


def test_info_names_stack_layer_and_kind(s2s_path):
    summary = summarize(s2s_path)
    place = {v.name: v.place for v in summary.variables}
    assert place["decoder.block.1.cross_attn@attention"] == "decoder 1 cross"
    assert place["decoder.block.0.self_attn@attention"] == "decoder 0 self"
    assert place["encoder.block.1@output"] == "encoder 1"
    row = next(line for line in format_summary(summary).splitlines()
               if line.startswith("decoder.block.1.cross_attn@attention"))
    assert "decoder 1 cross" in row and "(batch, head, decoder_query, key)" in row


def test_info_json_names_stack_layer_and_kind(s2s_path, capsys):
    import json

    assert main(["info", str(s2s_path), "--json"]) == 0
    by_name = {v["name"]: v for v in json.loads(capsys.readouterr().out)["variables"]}
    cross = by_name["decoder.block.0.cross_attn@attention"]
    assert (cross["stack"], cross["layer"], cross["attention"]) == ("decoder", 0, "cross")
    assert cross["place"] == "decoder 0 cross"
    assert by_name["encoder.block.0.mlp@output"]["attention"] is None


def test_report_draws_each_stack_and_the_cross_attention(s2s):
    page = report_html(s2s, ReportOptions(layer=1, stack="decoder", attention="cross",
                                          trace="s2s.zarr"))
    for caption in ("Norms (encoder)", "Norms (decoder)", "Layer-to-layer similarity (decoder)",
                    "Cross-attention (head 0): decoder.block.0.cross_attn@attention"):
        assert f"<figcaption>{caption}</figcaption>" in page
    assert "layerscope render hidden s2s.zarr --view norms --stack decoder --sample 0" in page
    assert ("layerscope render attention s2s.zarr --layer 1 --stack decoder --attention cross "
            "--head 0 --sample 0 -o head.png") in page
    assert 'class="skip"' not in page.split("<h2", 3)[1]  # nothing in Attention left out


def test_a_cross_attention_map_reads_only_itself_and_both_token_labels(s2s_path):
    import os

    from zarr.storage import LocalStore

    from .counting import CountingStore

    store = CountingStore(LocalStore(os.fspath(s2s_path), read_only=True))
    ds = layerscope.open_trace(store)
    store.reset()
    attention_heatmap(ds, layer=0, stack="decoder", attention="cross", sample=1)
    # the token masks tell each axis's real tokens (one row of each is read)
    assert set(store.chunk_reads()) == {"decoder.block.0.cross_attn@attention", "token_text",
                                        "decoder_token_text", "token_mask",
                                        "decoder_token_mask"}
