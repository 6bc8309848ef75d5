"""What one traced ``generate`` call asks for, read from its arguments before it runs: the
prompt, the length the stored sequences get, the special tokens; and what is refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.core.errors import CaptureError

_WORKS = "Greedy decoding and sampling (do_sample=True) work"


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: torch.Tensor  # (batch, token), on the host
    prompt_mask: torch.Tensor  # (batch, token): 1 for real prompt tokens
    new_tokens: int | None  # max_new_tokens, where given
    max_length: int  # max_length (given, or the generation config's), for max_new_tokens None
    pad_token_id: int
    eos_token_ids: tuple[int, ...]

    def stored_length(self, prompt_length: int) -> int:
        """The length every sequence is stored at: the prompt (the decoder's, for an
        encoder-decoder model) plus max_new_tokens (or max_length), so that calls with the
        same settings give samples of one length."""
        if self.new_tokens is not None:
            return prompt_length + self.new_tokens
        return max(self.max_length, prompt_length + 1)


def refuse_unsupported(config: Any, kwargs: dict[str, Any]) -> None:
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if int(beams) > 1:
        raise CaptureError(
            f"generate(num_beams={beams}) cannot be traced: beam search reorders and drops "
            f"hypotheses between steps. {_WORKS}")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise CaptureError(
            f"assisted generation cannot be traced: its steps verify several tokens at once. "
            f"{_WORKS}")


def read_request(model: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> GenerateRequest:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    refuse_unsupported(config, kwargs)
    ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise CaptureError("generate() inside a trace needs the prompt as input_ids, "
                           "(batch, token) integers")
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask

    def setting(name: str) -> Any:
        value = kwargs.get(name)
        return getattr(config, name, None) if value is None else value

    new_tokens = setting("max_new_tokens")
    max_length = setting("max_length") or 20  # generate()'s own default
    eos = setting("eos_token_id")
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else \
        ((int(eos),) if eos is not None else ())
    pad = setting("pad_token_id")
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
    return GenerateRequest(ids.detach().cpu(), mask.detach().cpu(),
                           int(new_tokens) if new_tokens is not None else None,
                           int(max_length), pad_id, eos_ids)


def sequences_of(output: Any) -> torch.Tensor:
    """The (batch, token) ids ``generate`` returned, as a tensor or in its output object."""
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(sequences, torch.Tensor):
        raise CaptureError("generate() returned no sequences to label the trace with")
    return sequences.detach().cpu()
