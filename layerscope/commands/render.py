"""``layerscope render KIND TRACE ... -o OUT``: draw one view of a trace as PNG, SVG or PDF."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerscope.core import open_trace
from layerscope.core.naming import STACKS

from . import HELP
from ._args import DPI_RANGE, MAX_BINS, MAX_CELLS, MAX_TOP_K, index, integer

ATTENTION_VIEWS = ("heatmap", "grid", "heads", "summary")
HIDDEN_VIEWS = ("norms", "trajectory", "similarity", "logit-lens")
ACTIVATION_VIEWS = ("channels", "neurons", "top-tokens")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "render", help=HELP["render"],
        description="Draw one view of a trace. The image format follows the suffix of -o.",
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    att = _common(kinds.add_parser("attention", help="attention maps of a transformer"))
    att.add_argument("--view", choices=ATTENTION_VIEWS, default="heatmap",
                     help="heatmap: one head; grid: layers x heads; heads: token-to-token "
                          "lines; summary: entropy / distance / special-token share per head")
    pick = att.add_mutually_exclusive_group()
    pick.add_argument("--variable", help="an attention variable by name (<site>@attention)")
    pick.add_argument("--layer", type=index, help="the attention of block N (attrs 'layer')")
    _stack(att, "attention maps")
    att.add_argument("--attention", choices=("self", "cross"),
                     help="self- or cross-attention, where a decoder layer has both")
    att.add_argument("--head", type=index, nargs="+", default=[0],
                     help="head index (heatmap: the first given; heads view: all given)")
    _window(att)
    att.set_defaults(run=_run_attention)

    hid = _common(kinds.add_parser("hidden", help="hidden states of the residual stream"))
    hid.add_argument("--view", choices=HIDDEN_VIEWS, default="norms")
    _stack(hid, "hidden states")
    hid.add_argument("--similarity", choices=("cka", "cosine"), default="cka",
                     help="measure of the similarity view (default: linear CKA)")
    hid.add_argument("--unembedding", metavar="NPY",
                     help="logit lens: a (vocab x hidden) matrix saved with numpy.save")
    hid.add_argument("--vocab", metavar="TXT", help="logit lens: one token per line")
    hid.set_defaults(run=_run_hidden)

    act = _common(kinds.add_parser("activations", help="convolution maps and MLP neurons"))
    act.add_argument("--view", choices=ACTIVATION_VIEWS, default="neurons",
                     help="channels: CNN channel maps over the image; neurons: neuron x token "
                          "heatmap; top-tokens: the tokens each neuron fires on most")
    pick = act.add_mutually_exclusive_group()
    pick.add_argument("--variable", help="the activation variable by name")
    pick.add_argument("--layer", type=index, help="MLP activation of block N")
    _stack(act, "MLP activations")
    act.add_argument("--channels", type=index, nargs="+", help="channels to draw (channels view)")
    act.add_argument("--neurons", type=index, nargs="+", help="neurons to draw")
    act.add_argument("--image", help="variable holding the input image (channels view)")
    act.add_argument("--top-k", type=integer(1, MAX_TOP_K), default=5,
                     help=f"tokens per neuron (top-tokens), 1..{MAX_TOP_K} (default 5)")
    act.set_defaults(run=_run_activations)

    sta = _common(kinds.add_parser("stats", help="per-layer value distributions, NaN/Inf flags"))
    sta.add_argument("--variable", nargs="+", help="variables to draw (default: the residual "
                                                   "stream, else the first captures)")
    sta.add_argument("--bins", type=integer(1, MAX_BINS), default=50,
                     help=f"histogram bins, 1..{MAX_BINS} (default 50)")
    sta.set_defaults(run=_run_stats)



def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("trace", metavar="TRACE", help="path of a layerscope trace (.zarr)")
    parser.add_argument("--sample", type=index, default=0, help="sample index (default 0)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="image to write: .png, .svg or .pdf")
    parser.add_argument("--dpi", type=integer(*DPI_RANGE), default=100,
                        help=f"resolution of PNG output, {DPI_RANGE[0]}..{DPI_RANGE[1]} "
                             "(default 100)")
    return parser


def _stack(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--stack", choices=STACKS,
        help=f"{what} of one stack of an encoder-decoder model (attrs 'stack'); required "
             "with --layer there, since each stack numbers its layers from 0",
    )


def _window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=index, nargs=2, metavar=("START", "STOP"),
                        help="zoom to token positions START..STOP-1 (long sequences)")
    parser.add_argument("--max-cells", type=integer(1, MAX_CELLS), default=512,
                        help="beyond this many positions per axis, max-pool the map "
                             f"(1..{MAX_CELLS}, default 512)")


def _check_output(path: str) -> Path:
    from layerscope.renderers import RenderError, limit_read_threads
    from layerscope.renderers._common import FORMATS

    limit_read_threads()  # before the first read: a view needs few chunks, memory stays low
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise RenderError(f"cannot write {target}: end the file name in .png, .svg or .pdf")
    if not target.parent.exists():
        raise RenderError(f"cannot write {target}: folder {target.parent} does not exist")
    return target


def _open(args: argparse.Namespace) -> Any:
    """The trace, once ``--sample`` is known to be one of its samples."""
    from layerscope.renderers import RenderError

    ds = open_trace(args.trace)
    samples = int(ds.sizes.get("batch", 0))
    if args.sample >= samples:
        raise RenderError(f"--sample {args.sample} is out of range: the trace holds {samples} "
                          f"samples (0..{samples - 1})")
    return ds


def _finish(fig: Any, output: str, dpi: int = 100) -> int:
    from layerscope.renderers import save

    written = save(fig, output, dpi)
    print(written)
    return 0


def _options(args: argparse.Namespace) -> Any:
    from layerscope.renderers import ViewOptions

    window = tuple(args.window) if args.window else None
    return ViewOptions(window=window, max_cells=args.max_cells)


def _run_attention(args: argparse.Namespace) -> int:
    from layerscope import renderers as r

    _check_output(args.output)
    ds = _open(args)
    view = args.view
    family = {"stack": args.stack, "attention": args.attention}
    if view == "heatmap":
        fig = r.attention_heatmap(ds, args.layer, args.head[0], args.sample, args.variable,
                                  _options(args), **family)
    elif view == "grid":
        options = _options(args)
        if args.max_cells == 512:  # small panels: pool harder unless asked
            options = r.ViewOptions(window=options.window, max_cells=64)
        fig = r.attention_grid(ds, args.sample, options, **family)
    elif view == "heads":
        options = _options(args)
        if args.max_cells == 512:
            options = r.ViewOptions(window=options.window, max_cells=64)
        fig = r.head_view(ds, args.layer, args.sample, args.head, args.variable, options,
                          **family)
    else:
        fig = r.head_summary_figure(ds, **family)
    return _finish(fig, args.output, args.dpi)


def _run_hidden(args: argparse.Namespace) -> int:
    from layerscope import renderers as r

    _check_output(args.output)
    ds = _open(args)
    if args.view == "norms":
        fig = r.hidden_norms(ds, args.sample, args.stack)
    elif args.view == "trajectory":
        fig = r.hidden_trajectory(ds, args.sample, args.stack)
    elif args.view == "similarity":
        fig = r.similarity_figure(ds, args.sample, args.similarity, args.stack)
    else:
        if not (args.unembedding and args.vocab):
            raise r.RenderError(
                "the logit lens needs the model's unembedding: pass --unembedding MATRIX.npy "
                "(vocab x hidden, e.g. the tied word embeddings) and --vocab VOCAB.txt"
            )
        fig = r.logit_lens(ds, r.Unembedding.load(args.unembedding, args.vocab), args.sample,
                           args.stack)
    return _finish(fig, args.output, args.dpi)


def _run_activations(args: argparse.Namespace) -> int:
    from layerscope import renderers as r

    _check_output(args.output)
    ds = _open(args)
    if args.view == "channels":
        if args.layer is not None or args.stack is not None:
            raise r.RenderError("the channels view picks a convolution by --variable NAME")
        fig = r.channel_grid(ds, args.variable, args.sample, args.channels, args.image)
    elif args.view == "neurons":
        fig = r.neuron_heatmap(ds, args.variable, args.sample, args.layer, args.neurons,
                               stack=args.stack)
    else:
        fig = r.top_tokens_figure(ds, args.variable, args.layer, args.top_k, args.neurons,
                                  stack=args.stack)
    return _finish(fig, args.output, args.dpi)


def _run_stats(args: argparse.Namespace) -> int:
    from layerscope import renderers as r

    _check_output(args.output)
    ds = _open(args)
    return _finish(r.distributions(ds, args.variable, args.bins), args.output, args.dpi)
