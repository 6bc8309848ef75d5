"""Every view on a trace of every family (GPT-2, Llama, T5, BART, ViT, ResNet, an LSTM LM,
keras-hub BERT, a Keras CNN, the Flax NNX BERT port; tiny, random weights), drawn through
``layerscope render``: each axis labeled by its own tokens and as many as the map has, the
title naming the variable and its stack and layer, images as large as the whole map; a view
that cannot draw a trace refuses in one line that says why."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import layerscope
from layerscope.cli import main
from layerscope.core.info import summarize
from layerscope.core.naming import roles_of
from layerscope.renderers import attention_heatmap

from .zoo_models import FLAX, KERAS, LAYERS, SOURCE, TARGET, TORCH, Family

FAMILIES = [*TORCH, *KERAS, *FLAX]
NEEDS = {**dict.fromkeys(KERAS, "keras_hub"), **dict.fromkeys(FLAX, "flax")}
ATTENTION_VIEWS = ("heatmap", "grid", "heads", "summary")
HIDDEN_VIEWS = ("norms", "trajectory", "similarity", "logit-lens")
LAYER_LABELS = ["embed", *(str(i) for i in range(LAYERS))]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Family]:
    return {}


@pytest.fixture(params=FAMILIES)
def family(request, built, tmp_path_factory) -> Family:
    name = request.param
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    if name not in built:  # traced once for the module, whichever test asks first
        make = {**TORCH, **KERAS, **FLAX}[name]
        built[name] = make(tmp_path_factory.mktemp("zoo") / f"{name}.zarr")
    return built[name]


@pytest.fixture()
def render(monkeypatch, capsys, tmp_path):
    """``layerscope render KIND TRACE ARGS``: (exit status, the figure it drew, stderr). The
    figure is kept instead of written, so its axes can be read back."""
    import layerscope.renderers as renderers

    drawn: list = []

    def keep(fig, path, dpi=100):
        drawn.append(fig)
        return Path(path)

    monkeypatch.setattr(renderers, "save", keep)

    def run(kind: str, family: Family, *args: str):
        drawn.clear()
        code = main(["render", kind, str(family.path), *args, "-o", str(tmp_path / "v.png")])
        err = capsys.readouterr().err
        return code, (drawn[0] if drawn else None), err

    return run


def _refused(result, reason: str) -> None:
    code, fig, err = result
    assert code == 2 and fig is None, err
    assert reason in err and err.count("\n") == 1, err


def _ticks(ax, which: str) -> list[str]:
    labels = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def _labels(family: Family, ds, dim: str) -> list[str]:
    """What labels ``dim`` of sample 0: its stack's token strings, else positions."""
    size = int(ds.sizes[dim])
    if not family.texts:
        return [str(i) for i in range(size)]
    text = "decoder_token_text" if dim.startswith("decoder_") else "token_text"
    labels = [str(t) for t in ds[text].isel(batch=0).values]
    assert len(labels) == size, (dim, text)
    return labels


def _all_labels(family: Family, ds, dim: str) -> set[str]:
    """The labels of ``dim`` over every sample (the top tokens come from all of them)."""
    if not family.texts:
        return {str(i) for i in range(int(ds.sizes[dim]))}
    text = "decoder_token_text" if dim.startswith("decoder_") else "token_text"
    return {str(t) for t in np.asarray(ds[text].values).ravel()}


def _place(da) -> str:
    """How views name a map's row: ``decoder 1 cross``, ``encoder 0``, ``layer 1``."""
    stack, layer = da.attrs.get("stack"), da.attrs["layer"]
    if not stack:
        return f"layer {layer}"
    return f"{stack} {layer} {da.attrs['attention']}" if stack == "decoder" else f"{stack} {layer}"


def _dims(da, *roles: str) -> list[str]:
    by_role = dict(zip(roles_of(da), da.dims, strict=True))
    return [str(by_role[r]) for r in roles]


def _attention_names(ds) -> list[str]:
    names = [str(n) for n in ds.data_vars if str(n).endswith("@attention")]
    return sorted(names, key=lambda n: ds[n].attrs["order"])


def _extent(rows: int, cols: int) -> list[float]:
    return [-0.5, cols - 0.5, rows - 0.5, -0.5]


def test_attention_views(family, render):
    ds = layerscope.open_trace(family.path)
    names = _attention_names(ds)
    if not family.attention:
        assert not names
        for view in ATTENTION_VIEWS:
            _refused(render("attention", family, "--view", view),
                     "this trace holds no attention probabilities")
        return
    assert len(names) == LAYERS * (3 if family.stacks else 1)
    places = [_place(ds[n]) for n in names]
    for name in names:  # the heatmap of every map: whole, each axis its own tokens
        da = ds[name]
        query, key, head = _dims(da, "query", "key", "head")
        last = int(da.sizes[head]) - 1
        # the renderer itself on one opened trace (the CLI opens it anew for each call)
        ax = attention_heatmap(ds, head=last, variable=name).axes[0]
        shown = ax.images[0]
        np.testing.assert_allclose(shown.get_array(), da.values[0, last])
        assert shown.get_extent() == _extent(da.sizes[query], da.sizes[key])
        assert _ticks(ax, "x") == _labels(family, ds, key)
        assert _ticks(ax, "y") == _labels(family, ds, query)
        assert name in ax.get_title() and f"{_place(da)}, head {last}" in ax.get_title()

    code, fig, err = render("attention", family, "--view", "grid")
    assert code == 0, err
    rows = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in rows] == places
    for ax, name in zip(rows, names, strict=True):
        query, key = _dims(ds[name], "query", "key")
        assert ax.images[0].get_extent() == _extent(ds.sizes[query], ds.sizes[key])

    name = names[-1]  # a decoder's cross-attention in an encoder-decoder model
    query, key = _dims(ds[name], "query", "key")
    code, fig, err = render("attention", family, "--view", "heads", "--variable", name,
                            "--head", "0", "1")
    assert code == 0, err
    texts = fig.axes[0].texts
    assert [t.get_text() for t in texts if t.get_position()[0] < 0.5] == _labels(family, ds, query)
    assert [t.get_text() for t in texts if t.get_position()[0] > 0.5] == _labels(family, ds, key)
    assert name in fig.axes[0].get_title()

    code, fig, err = render("attention", family, "--view", "summary")
    assert code == 0, err
    assert all(_ticks(ax, "y") == places for ax in fig.axes if ax.images)

    info = {v.name: v for v in summarize(family.path).variables}
    assert all(info[n].layer == ds[n].attrs["layer"] for n in names)
    if family.stacks:
        _check_stacks(family, ds, names, render)
    else:
        code, fig, err = render("attention", family, "--layer", "1")
        assert code == 0, err
        assert [n for n in names if n in fig.axes[0].get_title()] == [names[1]]


def _check_stacks(family: Family, ds, names: list[str], render) -> None:
    """Encoder self-, decoder self- and cross-attention, labeled as such and chosen by
    --stack / --attention; a bare --layer is refused."""
    kinds = {(ds[n].attrs["stack"], ds[n].attrs["attention"]) for n in names}
    assert kinds == {("encoder", "self"), ("decoder", "self"), ("decoder", "cross")}
    cross = [n for n in names if ds[n].attrs["attention"] == "cross"]
    for name in cross:
        assert ds[name].sizes[_dims(ds[name], "query")[0]] == TARGET
        assert ds[name].sizes[_dims(ds[name], "key")[0]] == SOURCE
    places = {v.name: v.place for v in summarize(family.path).variables}
    assert places[cross[1]] == "decoder 1 cross"
    _refused(render("attention", family, "--layer", "0"),
             "pass --stack encoder or --stack decoder")
    _refused(render("attention", family, "--layer", "1", "--stack", "decoder"),
             "pass --attention self or --attention cross")
    code, fig, err = render("attention", family, "--layer", "1", "--stack", "decoder",
                            "--attention", "cross")
    assert code == 0, err
    assert cross[1] in fig.axes[0].get_title()
    assert "decoder 1 cross" in fig.axes[0].get_title()


def test_hidden_views(family, render, tmp_path):
    matrix = np.random.default_rng(0).standard_normal((64, family.hidden_size))
    np.save(tmp_path / "w.npy", matrix)
    (tmp_path / "vocab.txt").write_text("".join(f"v{i}\n" for i in range(64)))
    lens = ("--unembedding", str(tmp_path / "w.npy"), "--vocab", str(tmp_path / "vocab.txt"))
    extra = {"logit-lens": lens}
    if not family.hidden:
        for view in HIDDEN_VIEWS:
            _refused(render("hidden", family, "--view", view, *extra.get(view, ())),
                     "this trace holds no block outputs")
        return
    ds = layerscope.open_trace(family.path)
    for view in HIDDEN_VIEWS if family.stacks else ():
        _refused(render("hidden", family, "--view", view, *extra.get(view, ())),
                 "pass --stack encoder or --stack decoder")
    for stack in family.stacks or (None,):
        chosen = ("--stack", stack) if stack else ()
        named = f"of the {stack}" if stack else "layer"
        axis = "decoder_token" if stack == "decoder" else _dims(ds[_first_block(ds)], "token")[0]
        tokens = _labels(family, ds, axis)
        assert len(tokens) == (TARGET if stack == "decoder" else family.tokens)
        drawn = {}
        for view in HIDDEN_VIEWS:
            code, drawn[view], err = render("hidden", family, "--view", view,
                                            *extra.get(view, ()), *chosen)
            assert code == 0, (view, err)
            assert named in drawn[view].axes[0].get_title() or view == "logit-lens"
        norms = drawn["norms"].axes[0]
        assert _ticks(norms, "y") == tokens and _ticks(norms, "x") == LAYER_LABELS
        assert norms.images[0].get_array().shape == (len(tokens), len(LAYER_LABELS))
        assert [t.get_text() for t in drawn["trajectory"].axes[0].texts] == tokens
        similarity = drawn["similarity"].axes[0]
        assert _ticks(similarity, "x") == _ticks(similarity, "y") == LAYER_LABELS
        lens_ax = drawn["logit-lens"].axes[0]
        assert _ticks(lens_ax, "y") == tokens and _ticks(lens_ax, "x") == LAYER_LABELS
        assert len(lens_ax.texts) == len(tokens) * len(LAYER_LABELS)


def _first_block(ds) -> str:
    """The block output of layer 0 (of a model without stacks)."""
    return next(str(n) for n in ds.data_vars if ds[n].attrs.get("layer") == 0
                and str(n).endswith("@output") and roles_of(ds[n]) == ("batch", "token", "hidden"))


def test_activation_views(family, render):
    ds = layerscope.open_trace(family.path)
    if not family.mlp:
        for view in ("neurons", "top-tokens"):
            _refused(render("activations", family, "--view", view),
                     "this trace holds no MLP activation")
    elif family.stacks:
        _refused(render("activations", family, "--layer", "1"),
                 "pass --stack encoder or --stack decoder")
    for stack in (family.stacks or (None,)) if family.mlp else ():
        chosen = ("--stack", stack) if stack else ()
        code, fig, err = render("activations", family, "--layer", "1", *chosen)
        assert code == 0, err
        ax = fig.axes[0]
        name = ax.get_title().split(" (")[0]
        da = ds[name]
        assert da.attrs["layer"] == 1 and (stack is None or da.attrs["stack"] == stack)
        token, neuron = _dims(da, "token", "neuron")
        assert _ticks(ax, "x") == _labels(family, ds, token)
        assert ax.images[0].get_extent() == _extent(min(64, da.sizes[neuron]), da.sizes[token])
        code, fig, err = render("activations", family, "--view", "top-tokens", "--layer", "1",
                                *chosen)
        assert code == 0, err
        assert name in fig.axes[0].get_title()
        words = {t.get_text().rsplit(" (", 1)[0] for t in fig.axes[0].texts}
        assert words <= {str(w) for w in _all_labels(family, ds, token)}
    if not family.conv:
        _refused(render("activations", family, "--view", "channels"),
                 "this trace holds no convolution output")
    for name in family.conv:
        code, fig, err = render("activations", family, "--view", "channels", "--variable", name)
        assert code == 0, err
        height, width = _dims(ds[name], "height", "width")
        panels = [ax for ax in fig.axes if ax.images]
        assert panels and name in fig.texts[0].get_text()
        for ax in panels:
            image = ax.images[-1]
            assert image.get_extent() == _extent(ds.sizes[height], ds.sizes[width])
            assert image.norm.vmin < image.norm.vmax
            if ds.sizes[height] * ds.sizes[width] == 1:  # a pooled map: its value is written
                value = float(np.asarray(image.get_array()).ravel()[0])
                assert f"{value:.3g}" in {t.get_text() for t in ax.texts}


def test_stats_view(family, render):
    ds = layerscope.open_trace(family.path)
    code, fig, err = render("stats", family)
    assert code == 0, err
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    assert titles and all(title in ds.data_vars for title in titles)
