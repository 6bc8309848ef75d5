"""``layerscope trace MODEL -o OUT.zarr``: run a model on texts or images and write a trace."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from layerscope._hf_architectures import folder_architecture
from layerscope._trace_generate import check_generate_request, sampling_settings, trace_generation
from layerscope._trace_inputs import check_request, model_inputs, read_request
from layerscope.api import capture
from layerscope.backends import detect
from layerscope.core import LayerscopeError, StoreOptions
from layerscope.core.info import human_bytes, stored_size, summarize
from layerscope.loading import FRAMEWORKS, load, model_folder

from . import HELP
from ._args import MAX_BATCH_SIZE, MAX_TOKENS, integer
from .estimate import check_disk, reusable, selection_of

DESCRIPTION = """MODEL is 'minilm' (the packaged all-MiniLM-L6-v2), a Hugging Face model folder, or
module:factory (a function returning a model, (model, tokenizer), or a dict with 'model'
and 'inputs').

A Hugging Face folder is loaded (in PyTorch) as the class its config.json names, head
included, and reads:
  causal LMs, encoders (Llama, BERT)  --text / --text-file (demo sentences without either)
  encoder-decoders (T5, BART)         --text in the encoder; the decoder reads --target-text
                                      (one per text) shifted right behind its start token,
                                      as in training: decoder position i predicts target
                                      token i. Default target: the input text itself
  vision models (ViT, ResNet)         --image PNG/JPEG files, through the folder's image
                                      processor; without one resized to the config's
                                      image_size (224 if none), scaled to 0..1 and
                                      normalized with the ImageNet mean and std
Audio and text-and-image models are refused: load them in Python (layerscope.capture).

--generate N continues each text by N tokens (greedy) and traces the prompt pass and every
decoding step: one generated sequence is one sample (token_step says which step made each
position; an encoder-decoder's generated tokens are on decoder_token).

Before the store is created, the trace's size is estimated as `layerscope estimate` does (the
model runs once on two samples, in memory), and a trace that does not fit the free disk is
refused; --force skips the estimate.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trace", help=HELP["trace"],
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="'minilm', a Hugging Face folder, or module:factory")
    parser.add_argument("-o", "--output", required=True, help="the trace store to write (.zarr)")
    add_input_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing trace")
    mode.add_argument("--append", action="store_true", help="append batches to an existing trace")
    parser.add_argument("--force", action="store_true",
                        help="trace even where the estimate of its size (layerscope estimate) "
                             "exceeds the free disk; skips the estimate")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """What a trace reads and captures (shared with ``layerscope estimate``)."""
    parser.add_argument("--text", action="append", help="an input text (repeatable)")
    parser.add_argument("--text-file", help="a file with one input text per line")
    parser.add_argument("--target-text", action="append",
                        help="encoder-decoder models: the decoder's text for the input text at "
                             "the same place (repeatable, one per text; default: the input "
                             "text itself)")
    parser.add_argument("--target-text-file", help="a file with one target text per line")
    parser.add_argument("--image", action="append",
                        help="vision models: a PNG or JPEG file (repeatable)")
    parser.add_argument("--capture", action="append",
                        help="glob on module paths, e.g. 'encoder.layer.*' (repeatable; default all)")
    parser.add_argument("--exclude", action="append", default=[], help="glob of paths to skip")
    parser.add_argument("--kinds", default="output,attention",
                        help="what to take at each site: output,input,attention (default: %(default)s)")
    parser.add_argument("--positions", metavar="WHICH",
                        help="store only these tokens of each captured tensor: last, first, "
                             "mask, or a slice such as 0:4 or -4: (of each text's real tokens)")
    parser.add_argument("--reduce", action="append", metavar="REDUCER",
                        help="store a reduction instead of the whole tensor: mean (over "
                             "tokens, padding excluded), norm (L2 over the feature axis), "
                             "topk(K) (the K largest features and their indices); "
                             "repeatable, one variable each")
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch",
                        help="framework to load a Hugging Face folder in (default: %(default)s)")
    parser.add_argument("--attn-implementation", choices=("eager", "sdpa"),
                        help="PyTorch attention kernel of a Hugging Face model")
    parser.add_argument("--batch-size", type=integer(1, MAX_BATCH_SIZE), default=8,
                        help=f"texts or images per forward pass, 1..{MAX_BATCH_SIZE} (default: %(default)s)")
    parser.add_argument("--generate", type=integer(1, MAX_TOKENS), metavar="N",
                        help="causal LMs and encoder-decoders (PyTorch): generate N tokens "
                             "(greedy unless --sample) for each text and trace every step")
    sampling = parser.add_argument_group("sampling (with --generate; off by default)")
    sampling.add_argument("--sample", action="store_true",
                          help="draw each token (do_sample) instead of taking the likeliest")
    sampling.add_argument("--temperature", type=float, help="sampling temperature")
    sampling.add_argument("--top-k", type=integer(1), help="sample among the K likeliest")
    sampling.add_argument("--top-p", type=float, help="sample within probability mass P")
    sampling.add_argument("--seed", type=integer(0), help="seed of the draws (repeatable runs)")
    parser.add_argument("--max-length", type=integer(1, MAX_TOKENS),
                        help=f"truncate texts (and target texts) to this many tokens, 1..{MAX_TOKENS}")


def run(args: argparse.Namespace) -> int:
    request = read_request(args)
    output = Path(args.output)
    if output.exists() and not (args.overwrite or args.append):
        raise LayerscopeError(f"{output} already exists; pass --overwrite or --append")
    if not output.parent.is_dir():
        raise LayerscopeError(f"cannot write {output}: folder {output.parent} does not exist")
    folder = model_folder(args.model)
    architecture = folder_architecture(folder, args.framework) if folder else None
    if args.generate:
        check_generate_request(request, args.framework)
    sampling = sampling_settings(args)
    check_request(request, architecture, args.framework, folder)  # before weights are read
    selection = selection_of(args)
    loaded = load(args.model, args.framework, args.attn_implementation, architecture)
    detect(loaded.model)  # something that is not a model is refused before its inputs
    mode = "w" if args.overwrite else "a" if args.append else "w-"
    inputs = None if args.generate else reusable(
        model_inputs(request, loaded, args.batch_size, output, args.append))
    if not args.force:  # before the store exists: a trace that cannot fit never starts
        check_disk(args, loaded, request, inputs, selection, mode)
    if args.generate:
        trace_generation(loaded, request.texts, args.output, selection,
                         new_tokens=args.generate, batch_size=args.batch_size,
                         max_length=args.max_length, mode=mode, progress=not args.no_progress,
                         sampling=sampling)
    else:
        capture(loaded.model, inputs, args.output, selection, tokenizer=loaded.tokenizer,
                batch_size=args.batch_size, max_length=args.max_length,
                progress=not args.no_progress, options=StoreOptions(mode=mode))
    summary = summarize(args.output)
    print(f"wrote {args.output}: {len(summary.variables)} variables, "
          f"{summary.attrs.get('committed_samples')} samples, "
          f"{stored_size(summary)}, {human_bytes(summary.raw_bytes)} raw")
    print(f"next: layerscope info {args.output}")
    return 0
