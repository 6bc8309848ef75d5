"""``layerscope trace MODEL --generate N``: generation of N tokens for each text (greedy, or
sampled with ``--sample``), traced as one sample per generated sequence (see
``backends/_torch_generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerscope._hf_architectures import SEQ2SEQ
from layerscope._trace_inputs import DEMO_TEXTS, Request
from layerscope.api import trace
from layerscope.core import LayerscopeError, Selection, StoreOptions


def check_generate_request(request: Request, framework: str) -> None:
    """Refuse, before anything is loaded, what --generate cannot take."""
    if framework != "torch":
        raise LayerscopeError(f"--generate traces PyTorch generation; drop --framework {framework}")
    if request.images:
        raise LayerscopeError("--generate continues texts: drop --image")
    if request.targets:
        raise LayerscopeError(
            "--generate makes the decoder's tokens itself: drop --target-text (without "
            "--generate the decoder reads the target texts)")


def sampling_settings(args: Any) -> dict[str, Any]:
    """generate()'s sampling arguments from the command line: none unless --sample (with
    --generate); a sampling option without them is refused rather than ignored."""
    given = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "seed")
             if getattr(args, name, None) is not None}
    if (given or args.sample) and not args.generate:
        raise LayerscopeError("--sample, --temperature, --top-k, --top-p and --seed choose how "
                              "--generate draws tokens: add --generate N")
    if given and not args.sample:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise LayerscopeError(f"{options} apply to sampling: add --sample (generation is "
                              "greedy without it)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LayerscopeError(f"--top-p {args.top_p}: give a probability in (0, 1]")
    if args.temperature is not None and args.temperature <= 0:
        raise LayerscopeError(f"--temperature {args.temperature}: give a positive number")
    return {"do_sample": bool(args.sample), **given}


def trace_generation(loaded: Any, texts: list[str] | None, path: str | Path,
                     selection: Selection, *, new_tokens: int, batch_size: int,
                     max_length: int | None, mode: str, progress: bool,
                     sampling: dict[str, Any] | None = None,
                     pad_to: int | None = None) -> None:
    """``pad_to``: pad every prompt to this many tokens (at least the longest's), not to the
    longest's own length (``layerscope estimate`` probes a trace's first prompts at the
    length the whole trace pads them to)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise LayerscopeError(
            f"{type(model).__name__} cannot generate text: --generate is for causal LMs "
            "(Llama, GPT-2) and encoder-decoders (T5, BART)")
    if tokenizer is None:
        raise LayerscopeError("--generate needs the model's tokenizer (tokenizer files in "
                              "the folder)")
    texts = list(texts or loaded.inputs or DEMO_TEXTS)
    if not all(isinstance(text, str) for text in texts):
        raise LayerscopeError("--generate continues texts: give --text or --text-file")
    seq2seq = loaded.architecture is not None and loaded.architecture.kind == SEQ2SEQ
    prompts = _tokenized(tokenizer, texts, max_length, left_padding=not seq2seq, pad_to=pad_to)
    batches = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    import torch

    settings = dict(sampling or {"do_sample": False})
    seed = settings.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    with trace(model, path, selection, tokenizer=tokenizer,
               options=StoreOptions(mode=mode)) as active, torch.no_grad():
        for start in batches:
            active.set_texts(texts[start:start + batch_size])
            model.generate(**{name: value[start:start + batch_size]
                              for name, value in prompts.items()},
                           max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                           **settings)


def _tokenized(tokenizer: Any, texts: list[str], max_length: int | None,
               left_padding: bool, pad_to: int | None = None) -> dict[str, Any]:
    """All prompts padded to one length (every batch appends samples of one length); a
    decoder-only model's on the left, so that generation continues each text's last token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LayerscopeError("the tokenizer has neither a pad nor an end-of-sequence "
                                  "token to pad prompts of different lengths with")
        tokenizer.pad_token = tokenizer.eos_token  # masked out: only fills the left padding
    tokenizer.padding_side = "left" if left_padding else "right"
    if pad_to is not None:
        encoded = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                            max_length=pad_to)
    else:
        encoded = tokenizer(texts, return_tensors="pt", padding=True,
                            truncation=max_length is not None, max_length=max_length)
    return {name: encoded[name] for name in ("input_ids", "attention_mask")}
