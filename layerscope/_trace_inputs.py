"""What ``layerscope trace`` feeds a model — texts, target texts or images — checked against
the kind of model a Hugging Face folder holds before anything is loaded or written."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope._hf_architectures import AUDIO, MULTIMODAL, SEQ2SEQ, TEXT, VISION, Architecture
from layerscope._images import check_image_files, pixel_batches
from layerscope.batches import TextPairs
from layerscope.core import LayerscopeError

#: traced when a text model is given no text
DEMO_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Attention lets every token look at every other token.",
    "Zarr stores chunked, compressed arrays on disk.",
    "A picture of the inside of a network helps you trust it.",
)


@dataclass(frozen=True)
class Request:
    texts: list[str] | None
    targets: list[str] | None
    images: list[Path]


def read_request(args: argparse.Namespace) -> Request:
    """The inputs the command line names; files are read (images only checked) here."""
    return Request(
        _read_lines(args.text, args.text_file, "--text-file"),
        _read_lines(args.target_text, args.target_text_file, "--target-text-file"),
        check_image_files(args.image or []),
    )


def _read_lines(given: list[str] | None, file: str | None, option: str) -> list[str] | None:
    lines = list(given or [])
    if file:
        path = Path(file)
        if not path.is_file():
            raise LayerscopeError(f"{option} {path}: no such file")
        lines += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise LayerscopeError(f"{option} {path} holds no text")
    return lines or None


def check_request(request: Request, architecture: Architecture | None, framework: str,
                  folder: Path | None) -> None:
    """Refuse, with what to do instead, inputs the model cannot take and models the CLI
    cannot feed."""
    extras = request.images or request.targets
    if architecture is None:
        if extras and folder is None:
            raise LayerscopeError(
                "--image and --target-text apply to Hugging Face folders; a module:factory "
                "returns its own inputs (a dict with 'inputs')"
            )
        if extras:
            raise LayerscopeError(
                f"--framework {framework} traces text models; pass --framework torch for "
                "images and target texts"
            )
        return
    name, kind = architecture.class_name, architecture.kind
    if kind == AUDIO:
        raise LayerscopeError(
            f"{name} is an audio model (it takes {architecture.main_input}) and the CLI has no "
            f"audio input; load it in Python and call layerscope.capture(model, "
            f"{{'{architecture.main_input}': ...}}, 'out.zarr')"
        )
    if kind == MULTIMODAL:
        raise LayerscopeError(
            f"{name} takes text together with images or audio, which the CLI does not build; "
            "pass module:factory returning the model and its inputs"
        )
    if framework != "torch" and kind != TEXT:
        raise LayerscopeError(
            f"--framework {framework} loads text models only; trace {name} with --framework torch"
        )
    if kind == VISION:
        _check_vision(request, name)
    else:
        _check_text(request, architecture)


def _check_vision(request: Request, name: str) -> None:
    if request.texts or request.targets:
        raise LayerscopeError(
            f"{name} is a vision model and reads no text; drop --text/--target-text and "
            "give --image FILE"
        )
    if not request.images:
        raise LayerscopeError(f"{name} is a vision model: give --image FILE (PNG or JPEG, repeatable)")


def _check_text(request: Request, architecture: Architecture) -> None:
    name = architecture.class_name
    if request.images:
        raise LayerscopeError(
            f"{name} is a text model: --image is for vision models; give --text or --text-file"
        )
    if architecture.kind == TEXT:
        if request.targets:
            raise LayerscopeError(
                f"--target-text is for encoder-decoder models (T5, BART); {name} reads --text only"
            )
        return
    if architecture.decoder_start_token_id is None:
        raise LayerscopeError(
            f"{architecture.folder} names no decoder_start_token_id (in config.json or "
            "generation_config.json), so the decoder's first token is unknown; add it "
            "(T5 starts from its pad token, BART from </s>)"
        )
    if request.targets and request.texts is None:
        raise LayerscopeError("--target-text needs --text or --text-file: one target per text")
    if request.targets and request.texts and len(request.targets) != len(request.texts):
        raise LayerscopeError(
            f"give one --target-text per input text: {len(request.texts)} texts, "
            f"{len(request.targets)} target texts"
        )


def model_inputs(request: Request, loaded: Any, batch_size: int, output: Path,
                 append: bool) -> Any:
    """What ``capture`` runs: pixel batches, texts, or texts with their targets."""
    architecture: Architecture | None = loaded.architecture
    if architecture is not None and architecture.kind == VISION:
        return pixel_batches(request.images, loaded.model.config, loaded.image_processor,
                             batch_size)
    inputs: Any = request.texts if request.texts is not None else loaded.inputs
    if inputs is None:
        if loaded.tokenizer is None:
            raise LayerscopeError("give --text or --text-file (or a factory that returns inputs)")
        inputs = list(DEMO_TEXTS)
    if architecture is not None and architecture.kind == SEQ2SEQ:
        assert architecture.decoder_start_token_id is not None  # check_request refused it
        return TextPairs(inputs, request.targets or inputs, architecture.decoder_start_token_id,
                         _stored_decoder_length(output) if append else None)
    return inputs


def _stored_decoder_length(path: Path) -> int | None:
    """The decoder length of a trace being appended to: new targets are padded to it."""
    from layerscope.core import open_trace

    if not path.exists():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an unfinished store: the append says so
        return open_trace(path).sizes.get("decoder_token")
