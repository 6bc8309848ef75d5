"""Hidden-state views: per-layer norms, token trajectories (PCA across layers), layer-to-layer
similarity (cosine or linear CKA) and the logit lens.

The residual stream is taken from the block outputs: variables of kind ``output`` with dims
(batch, token, hidden) at numbered sites (attrs ``layer``), the outermost site of each layer
(``encoder.layer.3`` rather than ``encoder.layer.3.output.dense``), preceded by the embedding
output when one is found (the outermost un-numbered (batch, token, hidden) output executed
before the first block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerscope.core.naming import roles_of

from ._common import (
    PAD_TOKENS,
    RenderError,
    captures,
    check_range,
    check_sample,
    dim_of,
    escape,
    kind_of,
    label_ticks,
    new_figure,
)
from ._families import (
    axis_labels,
    choose,
    color_range,
    real_rows,
    sample_texts,
    stacks_in,
    token_span,
    write_value,
)

STREAM_ROLES = ("batch", "token", "hidden")


@dataclass(frozen=True)
class Stream:
    """The residual stream: one variable per step, with a label per step."""

    names: tuple[str, ...]
    labels: tuple[str, ...]
    hidden_dim: str
    token_dim: str
    stack: str | None = None

    def described(self) -> str:
        """`` of the decoder`` where the stream is one stack's, else nothing."""
        return f" of the {self.stack}" if self.stack else ""


def _is_stream(ds: Any, name: str) -> bool:
    da = ds[name]
    if kind_of(name, da) != "output" or da.attrs.get("call_index", 0) != 0:
        return False
    return da.ndim == 3 and roles_of(da) == STREAM_ROLES


def block_outputs(ds: Any, include_embeddings: bool = True, stack: str | None = None) -> Stream:
    """The variables holding the residual stream, in layer order: of ``stack`` (``encoder``
    or ``decoder``) in an encoder-decoder trace, where each stack has its own stream and
    not naming one is refused."""
    names = [n for n in captures(ds) if _is_stream(ds, n)]
    blocks = [n for n in names if ds[n].attrs.get("layer") is not None]
    stacks = stacks_in(ds, blocks)
    if stack is not None:
        blocks = choose(ds, blocks, "block output", None, stack)
    elif len(stacks) > 1:
        raise RenderError(
            f"this trace has {len(stacks)} stacks ({', '.join(stacks)}), each with its own "
            f"hidden states; pass --stack {' or --stack '.join(stacks)}"
        )
    by_layer: dict[int, str] = {}
    for name in blocks:
        layer = ds[name].attrs.get("layer")
        site = str(ds[name].attrs.get("site", name.split("@")[0]))
        current = by_layer.get(int(layer))
        if current is None or _depth(site) < _depth(str(ds[current].attrs.get("site", current))):
            by_layer[int(layer)] = name
    if not by_layer:
        raise RenderError(
            "this trace holds no block outputs (variables of dims (batch, token, hidden) at "
            "numbered sites such as 'encoder.layer.3'); capture the transformer blocks' outputs"
        )
    layers = sorted(by_layer)
    hidden = {ds[by_layer[n]].sizes[dim_of(ds[by_layer[n]], "hidden")] for n in layers}
    if len(hidden) > 1:
        raise RenderError(f"block outputs have different widths {sorted(hidden)}; "
                          "hidden-state views need one residual-stream width")
    chosen = [by_layer[n] for n in layers]
    labels = [str(n) for n in layers]
    if include_embeddings:
        embed = _embedding_output(ds, names, chosen[0])
        if embed is not None:
            chosen.insert(0, embed)
            labels.insert(0, "embed")
    first = ds[chosen[-1]]
    return Stream(tuple(chosen), tuple(labels), str(dim_of(first, "hidden")),
                  str(dim_of(first, "token")), stack)


def _depth(site: str) -> int:
    return site.count(".")


def _embedding_output(ds: Any, names: list[str], first_block: str) -> str | None:
    block = ds[first_block]
    first_order = block.attrs.get("order", 0)
    width = block.sizes[dim_of(block, "hidden")]
    token = dim_of(block, "token")  # a decoder's embedding is along the decoder's tokens
    before = [
        n for n in names
        if ds[n].attrs.get("layer") is None and ds[n].attrs.get("order", 0) < first_order
        and ds[n].sizes[dim_of(ds[n], "hidden")] == width and dim_of(ds[n], "token") == token
    ]
    if not before:
        return None
    # the outermost module, the latest one executed among equals (the embedding block's output)
    return min(before, key=lambda n: (_depth(str(ds[n].attrs.get("site", n))),
                                      -ds[n].attrs.get("order", 0)))


def _sample_stack(ds: Any, stream: Stream, sample: int) -> tuple[np.ndarray, list[str]]:
    """(steps, tokens, hidden) of one sample, padding cut; read one step at a time."""
    first = ds[stream.names[0]]
    check_sample(ds, first, sample)
    size = int(first.sizes[stream.token_dim])
    labels = axis_labels(ds, stream.token_dim, sample, size)
    start, stop = token_span(ds, stream.token_dim, sample, labels)
    steps = []
    for name in stream.names:
        da = ds[name]
        one = da.isel({dim_of(da, "batch"): sample, stream.token_dim: slice(start, stop)})
        steps.append(np.asarray(one.transpose(stream.token_dim, stream.hidden_dim).values,
                                dtype=np.float64))
    return np.stack(steps), labels[start:stop]


def hidden_norms(ds: Any, sample: int = 0, stack: str | None = None) -> Any:
    """L2 norm of the hidden state of each token (rows) after each layer (columns)."""
    stream = block_outputs(ds, stack=stack)
    states, labels = _sample_stack(ds, stream, sample)
    norms = np.linalg.norm(states, axis=2).T  # (tokens, steps)
    fig = new_figure(1.0 + 0.6 * len(stream.names) + 1.5, 1.5 + 0.22 * min(len(labels), 64))
    ax = fig.add_subplot()
    vmin, vmax = color_range(norms)
    image = ax.imshow(norms, cmap="cividis", vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    write_value(ax, norms)
    ax.set_xticks(range(len(stream.labels)), list(stream.labels))
    ax.set_xlabel("layer")
    label_ticks(ax, labels, "y")
    ax.set_title(f"hidden-state norm per token and layer{stream.described()}, sample {sample}",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="L2 norm")
    return fig


# -- PCA trajectories --------------------------------------------------------------------


def fit_pca(ds: Any, stream: Stream, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top principal axes of every (unpadded) token vector of every layer of the
    whole trace, accumulated chunk by chunk (a running sum and Gram matrix: memory grows with
    hidden^2, not with the data)."""
    check_range(components, "components", 1)
    width = int(ds[stream.names[0]].sizes[stream.hidden_dim])
    total = np.zeros(width)
    gram = np.zeros((width, width))
    count = 0
    for name in stream.names:
        da = ds[name]
        batch_dim = str(dim_of(da, "batch"))
        step = _batch_step(da, batch_dim)
        for start in range(0, int(da.sizes[batch_dim]), step):
            block = da.isel({batch_dim: slice(start, start + step)})
            values = block.transpose(batch_dim, stream.token_dim, stream.hidden_dim).values
            rows = np.asarray(values, np.float64).reshape(-1, width)
            keep = np.isfinite(rows).all(axis=1)
            # padding would pull the axes towards itself
            text = sample_texts(ds, stream.token_dim, slice(start, start + step))
            if text is not None and text.size == len(rows):
                keep &= ~np.isin(text, list(PAD_TOKENS)).reshape(-1)
            real = real_rows(ds, stream.token_dim, slice(start, start + step))
            if real is not None and real.size == len(rows):
                keep &= real.reshape(-1)
            rows = rows[keep]
            total += rows.sum(axis=0)
            gram += rows.T @ rows
            count += len(rows)
    if count < 2:
        raise RenderError("too few hidden-state vectors to fit a PCA (need at least 2)")
    mean = total / count
    cov = gram / count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:components]
    return mean, vectors[:, order]


def _batch_step(da: Any, batch_dim: str) -> int:
    chunks = getattr(da, "chunksizes", {}).get(batch_dim)
    return int(chunks[0]) if chunks else 1


def hidden_trajectory(ds: Any, sample: int = 0, stack: str | None = None) -> Any:
    """Each token's path through the layers in the plane of the first two principal axes."""
    stream = block_outputs(ds, stack=stack)
    mean, axes = fit_pca(ds, stream)
    states, labels = _sample_stack(ds, stream, sample)
    points = (states - mean) @ axes  # (steps, tokens, 2)
    fig = new_figure(7.5, 6.0)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    steps = len(stream.names)
    for token in range(points.shape[1]):
        path = points[:, token]
        ax.plot(path[:, 0], path[:, 1], color="0.75", linewidth=0.8, zorder=1)
        ax.scatter(path[:, 0], path[:, 1], c=[cmap(i / max(steps - 1, 1)) for i in range(steps)],
                   s=14, zorder=2)
        ax.annotate(escape(labels[token]), path[-1], fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"token trajectories across layers{stream.described()} ({stream.labels[0]} "
                 f"-> {stream.labels[-1]}), labelled at the last layer, sample {sample}",
                 fontsize=9)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    depth = ScalarMappable(Normalize(0, max(steps - 1, 1)), cmap)
    bar = fig.colorbar(depth, ax=ax, shrink=0.8, label="layer")
    bar.set_ticks(range(steps), labels=list(stream.labels))
    return fig


# -- layer-to-layer similarity ----------------------------------------------------------


def layer_similarity(ds: Any, sample: int = 0, method: str = "cka",
                     stack: str | None = None) -> tuple[np.ndarray, Stream]:
    """(steps x steps) similarity of the residual stream between layers, over the tokens of
    one sample: linear CKA, or the mean cosine of the same token at the two layers."""
    if method not in ("cka", "cosine"):
        raise RenderError(f"unknown similarity {method!r}; use 'cka' or 'cosine'")
    stream = block_outputs(ds, stack=stack)
    states, _ = _sample_stack(ds, stream, sample)
    steps = len(states)
    out = np.ones((steps, steps))
    if method == "cosine":
        unit = states / np.maximum(np.linalg.norm(states, axis=2, keepdims=True), 1e-12)
        out = np.einsum("ith,jth->ij", unit, unit) / states.shape[1]
    else:
        centered = states - states.mean(axis=1, keepdims=True)
        grams = np.einsum("ith,iuh->itu", centered, centered)  # token x token per layer
        for i in range(steps):
            for j in range(steps):
                out[i, j] = _cka(grams[i], grams[j])
    return out, stream


def _cka(a: np.ndarray, b: np.ndarray) -> float:
    # linear CKA from centred Gram matrices: <A,B>_F / (|A|_F |B|_F)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def similarity_figure(ds: Any, sample: int = 0, method: str = "cka",
                      stack: str | None = None) -> Any:
    matrix, stream = layer_similarity(ds, sample, method, stack)
    fig = new_figure(0.45 * len(stream.labels) + 2.5, 0.45 * len(stream.labels) + 2.0)
    ax = fig.add_subplot()
    vmin, vmax = color_range(matrix, low=min(0.0, float(np.nanmin(matrix))), high=1.0)
    image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
    write_value(ax, matrix)
    ticks = range(len(stream.labels))
    ax.set_xticks(ticks, list(stream.labels))
    ax.set_yticks(ticks, list(stream.labels))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(f"layer-to-layer similarity{stream.described()} "
                 f"({'linear CKA' if method == 'cka' else 'cosine'}), sample {sample}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


# -- logit lens --------------------------------------------------------------------------


@dataclass(frozen=True)
class Unembedding:
    """Maps hidden states to vocabulary logits: ``logits = h @ matrix.T + bias``.

    ``matrix``: (vocab, hidden), e.g. the tied word-embedding matrix of a BERT-like model.
    """

    matrix: np.ndarray
    vocab: Sequence[str]
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[0] != len(self.vocab):
            raise RenderError(
                f"unembedding matrix of shape {self.matrix.shape} does not match a vocabulary "
                f"of {len(self.vocab)} tokens; pass a (vocab, hidden) matrix and one string per row"
            )

    @classmethod
    def load(cls, matrix_path: str, vocab_path: str) -> Unembedding:
        """A (vocab, hidden) ``.npy`` matrix and a text file with one token per line."""
        try:
            matrix = np.load(matrix_path, allow_pickle=False)
            with open(vocab_path, encoding="utf-8") as handle:
                vocab = [line.rstrip("\n") for line in handle]
        except (OSError, ValueError) as exc:
            raise RenderError(f"cannot read the unembedding ({exc}); pass a .npy matrix "
                              "(vocab x hidden) and a vocabulary file, one token per line") from exc
        if vocab and vocab[-1] == "" and len(vocab) == matrix.shape[0] + 1:
            vocab = vocab[:-1]
        return cls(matrix, vocab)


def logit_lens_table(ds: Any, unembedding: Unembedding, sample: int = 0, top: int = 5,
                     stack: str | None = None) -> Any:
    """Top-``top`` tokens and their probabilities for every layer and position of a sample:
    an xarray Dataset with ``token_top`` (str) and ``probability`` (layer, token, rank)."""
    import xarray as xr

    check_range(top, "top", 1)

    stream = block_outputs(ds, stack=stack)
    states, labels = _sample_stack(ds, stream, sample)
    if states.shape[2] != unembedding.matrix.shape[1]:
        raise RenderError(
            f"the unembedding expects width {unembedding.matrix.shape[1]}, the hidden states "
            f"have {states.shape[2]}; pass the matrix of this model"
        )
    weights = np.asarray(unembedding.matrix, dtype=np.float64)
    logits = states @ weights.T
    if unembedding.bias is not None:
        logits += unembedding.bias
    logits -= logits.max(axis=2, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=2, keepdims=True)
    best = np.argsort(-probs, axis=2)[:, :, :top]
    vocab = np.asarray(unembedding.vocab, dtype=object)
    return xr.Dataset(
        {"token_top": (("layer", "token", "rank"), vocab[best].astype(str)),
         "probability": (("layer", "token", "rank"),
                         np.take_along_axis(probs, best, axis=2))},
        coords={"layer": list(stream.labels), "token_text": ("token", labels)},
    )


def logit_lens(ds: Any, unembedding: Unembedding, sample: int = 0,
               stack: str | None = None) -> Any:
    """A grid of the top-1 token per layer (columns) and position (rows), colored by its
    probability; the input tokens label the rows."""
    table = logit_lens_table(ds, unembedding, sample, top=1, stack=stack)
    words = table["token_top"].values[:, :, 0].T  # (tokens, layers)
    probs = table["probability"].values[:, :, 0].T
    labels = [str(t) for t in table["token_text"].values]
    layers = [str(v) for v in table["layer"].values]
    fig = new_figure(1.2 * len(layers) + 2.0, 0.3 * len(labels) + 1.5)
    ax = fig.add_subplot()
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(words.shape[0]):
        for col in range(words.shape[1]):
            ax.text(col, row, escape(words[row, col]), ha="center", va="center", fontsize=7,
                    color="white" if probs[row, col] > 0.6 else "black")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer")
    label_ticks(ax, labels, "y")
    ax.set_title(f"logit lens: top token per layer and position, sample {sample}", fontsize=9)
    fig.colorbar(image, ax=ax, label="probability")
    return fig
