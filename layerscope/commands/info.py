"""``layerscope info TRACE``: what a trace holds, without reading its arrays."""

from __future__ import annotations

import argparse
import json
from typing import Any

from layerscope.core.info import format_summary, summarize

from . import HELP


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("info", help=HELP["info"])
    parser.add_argument("trace", help="path of a trace store (.zarr)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    summary = summarize(args.trace)
    if args.json:
        print(json.dumps({
            "path": summary.path, "attrs": summary.attrs,
            "variables": [{**v.__dict__, "place": v.place} for v in summary.variables],
            "skipped": summary.skipped,
        }, indent=2, default=list))
    else:
        print(format_summary(summary))
    return 0
