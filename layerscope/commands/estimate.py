"""``layerscope estimate MODEL --samples N``: how many bytes a trace will take, and whether the
disk where it would go has room for it. ``layerscope trace`` runs the same check first."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerscope._estimate import Estimate, estimate, estimate_generation, refusal
from layerscope._estimate.result import human_bytes
from layerscope._hf_architectures import folder_architecture
from layerscope._trace_generate import check_generate_request
from layerscope._trace_inputs import DEMO_TEXTS, Request, check_request, model_inputs, read_request
from layerscope.backends import detect
from layerscope.core import LayerscopeError, Selection
from layerscope.core.reduce_spec import split_specs
from layerscope.loading import load, model_folder

from . import HELP
from ._args import integer

#: the most samples an estimate is asked about (a trillion: any real data set)
MAX_SAMPLES = 10**12

DESCRIPTION = """Say how many bytes `layerscope trace` with the same options would write, and
whether it fits in the free disk where the store would go (-o; default: here).

The model runs once, on the first two samples of the first batch the trace would run
(tokenized and padded as the trace would), into a store in memory: nothing is written. That
gives every variable's shape and what the writer's compression makes of it; the sizes are
scaled to --samples N by the writer's own chunk layout. Token axes take the probe's length:
for texts, the longest text given (the trace pads every text to it), so N samples of texts
like those given. Exit status 0 when it fits, 1 when it does not (trace would refuse).
"""


def register(subparsers: Any) -> None:
    from .trace import add_input_arguments  # here: trace imports this module too

    parser = subparsers.add_parser(
        "estimate", help=HELP["estimate"],
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="'minilm', a Hugging Face folder, or module:factory")
    parser.add_argument("--samples", type=integer(1, MAX_SAMPLES), metavar="N",
                        help="samples the trace will hold (default: as many as the inputs "
                             "given; more are taken to be like them)")
    parser.add_argument("-o", "--output", default=".",
                        help="where the store would go (default: the current folder); the "
                             "free space of its nearest existing folder is reported")
    add_input_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="the trace would replace the store at -o (its space counts as free)")
    mode.add_argument("--append", action="store_true",
                      help="the trace would append to the store at -o (texts padded to it)")
    parser.add_argument("--variables", action="store_true",
                        help="list every variable's estimated size, largest first")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the same checks and loading as `layerscope trace`, so it refuses what trace refuses
    request = read_request(args)
    folder = model_folder(args.model)
    architecture = folder_architecture(folder, args.framework) if folder else None
    if args.generate:
        check_generate_request(request, args.framework)
    check_request(request, architecture, args.framework, folder)
    selection = selection_of(args)
    if not args.json:
        print(f"loading {args.model} ...", file=sys.stderr)
    loaded = load(args.model, args.framework, args.attn_implementation, architecture)
    detect(loaded.model)
    mode = "w" if args.overwrite else "a" if args.append else "w-"
    inputs = None if args.generate else model_inputs(request, loaded, args.batch_size,
                                                     Path(args.output), args.append)
    if not args.json:
        print("probing: running the model once ...", file=sys.stderr)
    result = estimate_for(args, loaded, request, inputs, selection, mode)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(result.describe(variables=args.variables))
    return 0 if result.fits else 1


def selection_of(args: argparse.Namespace) -> Selection:
    """What ``layerscope trace`` and ``layerscope estimate`` with ``args`` capture: sites,
    kinds (a kind may carry steps: ``output:topk(hidden,8)``), positions and reductions."""
    selection = Selection.of(args.capture, tuple(split_specs(args.kinds)), args.exclude,
                             positions=args.positions, reduce=args.reduce)
    if args.generate and selection.reduces:
        raise LayerscopeError("--positions / --reduce do not apply to --generate yet")
    selection.specs()  # a reduction or slice it cannot read is refused before weights load
    return selection


def estimate_for(args: argparse.Namespace, loaded: Any, request: Request, inputs: Any,
                 selection: Selection, mode: str) -> Estimate:
    """The estimate of the trace ``args`` describe (``layerscope trace`` has no --samples:
    its inputs are all it traces)."""
    samples = getattr(args, "samples", None)
    if args.generate:
        texts = list(request.texts or loaded.inputs or DEMO_TEXTS)
        if not all(isinstance(text, str) for text in texts):
            raise LayerscopeError("--generate continues texts: give --text or --text-file")
        return estimate_generation(loaded, texts, selection, new_tokens=args.generate,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   n_samples=samples, path=args.output, mode=mode)
    return estimate(loaded.model, inputs, samples, selection, path=args.output,
                    tokenizer=loaded.tokenizer, batch_size=args.batch_size,
                    max_length=args.max_length, mode=mode)


def reusable(inputs: Any) -> Any:
    """``inputs`` as a list where they are a one-shot iterator (a factory may return one):
    the estimate reads them before the trace does."""
    return list(inputs) if isinstance(inputs, Iterator) else inputs


def check_disk(args: argparse.Namespace, loaded: Any, request: Request, inputs: Any,
               selection: Selection, mode: str) -> None:
    """``layerscope trace``'s check: refuse, before the store exists, a trace whose
    estimated size exceeds the free disk."""
    result = estimate_for(args, loaded, request, inputs, selection, mode)
    free = "" if result.free_bytes is None else (
        f"; {human_bytes(result.free_bytes)} free at {result.where}")
    print(f"estimate: {result.samples:,} samples take about {human_bytes(result.disk_bytes)} "
          f"on disk{free}")
    if not result.fits:
        raise LayerscopeError(refusal(result, args.output))
