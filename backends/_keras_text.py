"""Text inputs for keras-hub models: a Hugging Face folder loader and a tokenizer adapter.

``layerscope.capture(model, texts, path, tokenizer=...)`` tokenizes the way Hugging Face
tokenizers do (``tokenizer(texts, padding=..., truncation=..., max_length=...,
return_tensors="np")`` and ``convert_ids_to_tokens``). :class:`KerasHubTokenizer` gives a
keras-hub tokenizer that interface and returns the inputs keras-hub backbones take:
``token_ids``, ``segment_ids`` and ``padding_mask``, with the start/end tokens added.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.core import BackendError


def _special(tokenizer: Any, name: str) -> int | None:
    try:
        value = getattr(tokenizer, name, None)
    except (AttributeError, ValueError):  # keras-hub raises before a vocabulary is set
        return None
    return int(value) if value is not None else None


class KerasHubTokenizer:
    """A keras-hub tokenizer seen through the Hugging Face calling convention.

    Each text becomes ``[start] + pieces + [end]`` (where the tokenizer defines those tokens),
    padded with the pad token; ``padding_mask`` is True on real tokens.
    """

    def __init__(self, tokenizer: Any, model_max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = int(model_max_length)
        self.start_id = _special(tokenizer, "start_token_id")
        self.end_id = _special(tokenizer, "end_token_id")
        pad = _special(tokenizer, "pad_token_id")
        self.pad_id = 0 if pad is None else pad

    def _encode(self, text: str, max_length: int | None, truncation: bool) -> list[int]:
        pieces = [int(i) for i in np.asarray(self.tokenizer(text)).reshape(-1)]
        extra = (self.start_id is not None) + (self.end_id is not None)
        if truncation and max_length is not None:
            pieces = pieces[:max(0, max_length - extra)]
        start = [self.start_id] if self.start_id is not None else []
        end = [self.end_id] if self.end_id is not None else []
        return start + pieces + end

    def __call__(self, texts: str | Sequence[str], padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None) -> dict[str, Any]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [self._encode(t, max_length, truncation) for t in batch]
        if padding in (True, "longest") or (padding == "max_length" and max_length is None):
            length = max((len(i) for i in ids), default=0)
        elif padding == "max_length":
            length = int(max_length)  # type: ignore[arg-type]
        elif return_tensors is None:
            return {"input_ids": ids, "token_ids": ids}
        else:
            raise BackendError("tensors from texts of different lengths need padding=True")
        token_ids = np.full((len(ids), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(ids), length), dtype=bool)
        for row, piece in enumerate(ids):
            token_ids[row, :len(piece)] = piece[:length]
            mask[row, :len(piece)] = True
        return {"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids),
                "padding_mask": mask}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [str(self.tokenizer.id_to_token(int(i))) for i in ids]


def is_keras_hub_tokenizer(tokenizer: Any) -> bool:
    return any(cls.__module__.startswith("keras_hub.") and cls.__name__ == "Tokenizer"
               for cls in type(tokenizer).__mro__)


def adapt_tokenizer(tokenizer: Any, model: Any = None) -> Any:
    """Wrap a keras-hub tokenizer or preprocessor for ``layerscope.capture``; others pass."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and is_keras_hub_tokenizer(inner):  # a keras-hub preprocessor
        length = getattr(tokenizer, "sequence_length", None)
        return KerasHubTokenizer(inner, int(length or _max_length(model)))
    if is_keras_hub_tokenizer(tokenizer):
        return KerasHubTokenizer(tokenizer, _max_length(model))
    return tokenizer


def _max_length(model: Any) -> int:
    length = getattr(model, "max_sequence_length", None)
    return int(length) if isinstance(length, int) else 512


def load_hf_folder(path: str | os.PathLike[str]) -> tuple[Any, KerasHubTokenizer]:
    """A Hugging Face model folder (``config.json`` + ``model.safetensors`` + tokenizer files)
    loaded into its keras-hub backbone, offline, with a tokenizer ``capture`` accepts."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BackendError(f"{folder} is not a Hugging Face model folder (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import keras_hub
    except ImportError as exc:
        raise BackendError(
            "loading a Hugging Face folder into Keras needs keras-hub: "
            "pip install 'layerscope[tensorflow]'"
        ) from exc
    try:
        backbone = keras_hub.models.Backbone.from_preset(str(folder))
        tokenizer = keras_hub.models.Tokenizer.from_preset(str(folder))
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise BackendError(
            f"keras-hub cannot load {folder}: {exc}. Supported are the architectures keras-hub "
            "converts from transformers (BERT, DistilBERT, RoBERTa, GPT-2, Llama, ...)"
        ) from exc
    return backbone, KerasHubTokenizer(tokenizer, _max_length(backbone))
