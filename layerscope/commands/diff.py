"""``layerscope diff A.zarr B.zarr``: compare two traces site by site.

Exit status: 0 when every compared pair agrees within tolerance, 1 when any pair is beyond
it (the table names the first divergence), 2 on bad input (cli.main turns errors into one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import HELP
from ._args import tolerance


def register(subparsers: Any) -> None:
    from layerscope.core.diff import DiffOptions

    defaults = DiffOptions()
    parser = subparsers.add_parser(
        "diff",
        help=HELP["diff"],
        description=(
            "Pair the captured variables of two traces (by a name map, else by name, execution "
            "order, kind and dim sizes), line dims up by role, and compare every pair: max abs "
            "error, max relative error, cosine similarity, pass/fail at |a-b| <= atol + rtol*|b|. "
            "Exit 0 when all agree, 1 when any pair is beyond tolerance, 2 on bad input."
        ),
        epilog=(
            "Name map: JSON or YAML, {'A pattern': 'B pattern', ...} or {'map': {...}}; "
            "'{n}' matches a number (layer index, '{n+1}' shifts it), '*' any text; patterns "
            "with '@' name variables, patterns without it map sites and keep the kind. Example: "
            '{"encoder.layer.{n}.attention.self@attention": '
            '"transformer_layer_{n}.attention@attention"}'
        ),
    )
    parser.add_argument("a", metavar="A.zarr",
                        help="first trace (its execution order ranks the sites)")
    parser.add_argument("b", metavar="B.zarr", help="second trace")
    parser.add_argument("--map", dest="name_map", metavar="FILE",
                        help="name map (JSON or YAML) pairing sites of A with sites of B")
    parser.add_argument("--rtol", type=tolerance, default=defaults.rtol,
                        help=f"relative tolerance (default {defaults.rtol:g})")
    parser.add_argument("--atol", type=tolerance, default=defaults.atol,
                        help=f"absolute tolerance (default {defaults.atol:g})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="also draw the error per site along depth (PNG, SVG or PDF)")
    parser.set_defaults(run=run)


_PLOT_FORMATS = (".png", ".svg", ".pdf")


def run(args: argparse.Namespace) -> int:
    from layerscope.core import LayerscopeError
    from layerscope.core.diff import diff

    if args.plot and Path(args.plot).suffix.lower() not in _PLOT_FORMATS:
        # checked before the comparison, which can take minutes on large traces
        raise LayerscopeError(f"--plot {args.plot}: end the file name in .png, .svg or .pdf")
    result = diff(args.a, args.b, name_map=args.name_map, rtol=args.rtol, atol=args.atol)
    if args.plot:
        from layerscope.renderers.diff import plot_diff

        plot_diff(result, args.plot)
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.table())
        if args.plot:
            print(f"plot: {args.plot}")
    return result.exit_code
