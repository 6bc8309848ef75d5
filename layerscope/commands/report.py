"""``layerscope report TRACE -o report.html``: the main views in one self-contained HTML file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerscope.core import open_trace
from layerscope.core.naming import STACKS

from . import HELP
from ._args import index, integer


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help=HELP["report"],
        description="Draw the main views of a trace into one HTML file with inlined images.",
    )
    parser.add_argument("trace", metavar="TRACE", help="path of a layerscope trace (.zarr)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="HTML file to write")
    parser.add_argument("--sample", type=index, default=0, help="sample to draw (default 0)")
    parser.add_argument("--layer", type=index, help="attention layer of the one-head view")
    parser.add_argument("--stack", choices=STACKS,
                        help="the stack of --layer in an encoder-decoder trace")
    parser.add_argument("--attention", choices=("self", "cross"),
                        help="self- or cross-attention of a decoder's --layer")
    parser.add_argument("--head", type=index, default=0, help="head of the one-head view")
    parser.add_argument("--unembedding", metavar="NPY",
                        help="logit lens: a (vocab x hidden) matrix saved with numpy.save")
    parser.add_argument("--vocab", metavar="TXT", help="logit lens: one token per line")
    parser.add_argument("--max-samples", type=integer(1), default=64,
                        help="summaries over the trace use the first N samples (default 64)")
    parser.add_argument("--svg", action="store_true",
                        help="inline vector images instead of base64 PNG (larger, sharper)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from layerscope.renderers import (
        RenderError,
        ReportOptions,
        Unembedding,
        limit_read_threads,
        write_report,
    )

    limit_read_threads()
    target = Path(args.output)
    if target.suffix.lower() not in (".html", ".htm"):
        raise RenderError(f"cannot write {target}: end the report's file name in .html")
    if not target.parent.exists():
        raise RenderError(f"cannot write {target}: folder {target.parent} does not exist")
    if bool(args.unembedding) != bool(args.vocab):
        raise RenderError("the logit lens needs both --unembedding MATRIX.npy and --vocab FILE")
    ds = open_trace(args.trace)
    samples = int(ds.sizes.get("batch", 0))
    if args.sample >= samples:
        raise RenderError(f"--sample {args.sample} is out of range: the trace holds {samples} "
                          f"samples (0..{samples - 1})")
    unembedding = Unembedding.load(args.unembedding, args.vocab) if args.unembedding else None
    options = ReportOptions(sample=args.sample, layer=args.layer, head=args.head,
                            stack=args.stack, attention=args.attention,
                            unembedding=unembedding, trace=str(args.trace),
                            image_format="svg" if args.svg else "png",
                            max_samples=args.max_samples)
    print(write_report(ds, target, options))
    return 0
