"""``layerscope verify TRACE``: read every chunk and report each damaged or missing one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from layerscope.core.verify import verify

from . import HELP


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("verify", help=HELP["verify"])
    parser.add_argument("trace", help="path of a trace store (.zarr)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = verify(args.trace, progress=not (args.quiet or args.json) and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            print(f"damaged  {problem}")
        for fault in report.faults:
            print(f"damaged  {fault.key}  {fault.problem}")
        for note in report.notes:
            print(f"note     {note.key}  {note.problem}")
        print(report.summary())
    return 0 if report.ok else 1
