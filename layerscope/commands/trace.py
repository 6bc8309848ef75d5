"""``layerscope trace MODEL -o OUT.zarr``: run a model on texts and write a trace."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerscope.api import capture
from layerscope.backends import detect
from layerscope.core import LayerscopeError, Selection, StoreOptions
from layerscope.core.info import human_bytes, summarize
from layerscope.loading import FRAMEWORKS, load

from ._args import MAX_BATCH_SIZE, MAX_TOKENS, integer

DEMO_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Attention lets every token look at every other token.",
    "Zarr stores chunked, compressed arrays on disk.",
    "A picture of the inside of a network helps you trust it.",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trace", help="run a model on texts and write what happens inside it to a Zarr store",
        description="MODEL is 'minilm' (the packaged all-MiniLM-L6-v2), a Hugging Face model "
                    "folder, or module:factory (a function returning a model, or (model, tokenizer)).",
    )
    parser.add_argument("model", help="'minilm', a Hugging Face folder, or module:factory")
    parser.add_argument("-o", "--output", required=True, help="the trace store to write (.zarr)")
    parser.add_argument("--text", action="append", help="an input text (repeatable)")
    parser.add_argument("--text-file", help="a file with one input text per line")
    parser.add_argument("--capture", action="append",
                        help="glob on module paths, e.g. 'encoder.layer.*' (repeatable; default all)")
    parser.add_argument("--exclude", action="append", default=[], help="glob of paths to skip")
    parser.add_argument("--kinds", default="output,attention",
                        help="what to take at each site: output,input,attention (default: %(default)s)")
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch",
                        help="framework to load a Hugging Face folder in (default: %(default)s)")
    parser.add_argument("--attn-implementation", choices=("eager", "sdpa"),
                        help="PyTorch attention kernel of a Hugging Face model")
    parser.add_argument("--batch-size", type=integer(1, MAX_BATCH_SIZE), default=8,
                        help=f"texts per forward pass, 1..{MAX_BATCH_SIZE} (default: %(default)s)")
    parser.add_argument("--max-length", type=integer(1, MAX_TOKENS),
                        help=f"truncate texts to this many tokens, 1..{MAX_TOKENS}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing trace")
    mode.add_argument("--append", action="store_true", help="append batches to an existing trace")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def read_texts(args: argparse.Namespace) -> list[str] | None:
    texts = list(args.text or [])
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise LayerscopeError(f"--text-file {path}: no such file")
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not texts:
            raise LayerscopeError(f"--text-file {path} holds no text")
    return texts or None


def run(args: argparse.Namespace) -> int:
    texts = read_texts(args)
    output = Path(args.output)
    if output.exists() and not (args.overwrite or args.append):
        raise LayerscopeError(f"{output} already exists; pass --overwrite or --append")
    if not output.parent.is_dir():
        raise LayerscopeError(f"cannot write {output}: folder {output.parent} does not exist")
    loaded = load(args.model, args.framework, args.attn_implementation)
    detect(loaded.model)  # something that is not a model is refused before its inputs
    inputs: Any = texts if texts is not None else loaded.inputs
    if inputs is None:
        if loaded.tokenizer is None:
            raise LayerscopeError("give --text or --text-file (or a factory that returns inputs)")
        inputs = list(DEMO_TEXTS)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    selection = Selection.of(args.capture, kinds, args.exclude)
    mode = "w" if args.overwrite else "a" if args.append else "w-"
    capture(loaded.model, inputs, args.output, selection, tokenizer=loaded.tokenizer,
            batch_size=args.batch_size, max_length=args.max_length, progress=not args.no_progress,
            options=StoreOptions(mode=mode))
    summary = summarize(args.output)
    print(f"wrote {args.output}: {len(summary.variables)} variables, "
          f"{summary.attrs.get('committed_samples')} samples, "
          f"{human_bytes(summary.stored_bytes)} stored ({human_bytes(summary.raw_bytes)} raw)")
    print(f"next: layerscope info {args.output}")
    return 0
