"""What a Hugging Face model folder holds, read from its ``config.json`` before any weight is
loaded: the transformers class to load (the one the folder was saved with, head included) and
the kind of input it takes, so the CLI can refuse what it cannot feed before it writes."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope.core import LayerscopeError

#: the kinds of model the CLI tells apart by the input they take
TEXT = "text"  # input_ids alone: causal LMs (Llama, GPT-2) and encoders (BERT)
SEQ2SEQ = "seq2seq"  # input_ids and decoder_input_ids: T5, BART
VISION = "vision"  # pixel_values: ViT, ResNet
AUDIO = "audio"  # input_values / input_features: Wav2Vec2, Whisper
MULTIMODAL = "multimodal"  # text together with images or audio: CLIP, LLaVA

_AUDIO_INPUTS = ("input_values", "input_features")
_SUBMODEL_CONFIGS = ("vision_config", "audio_config")


@dataclass(frozen=True)
class Architecture:
    folder: Path
    class_name: str  # a class transformers exports, e.g. LlamaForCausalLM
    kind: str
    main_input: str  # the input the class names first (``main_input_name``)
    decoder_start_token_id: int | None = None  # seq2seq only

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.class_name)


def folder_architecture(folder: Path, framework: str) -> Architecture | None:
    """:func:`read_architecture` where transformers is installed. Without it, or where
    transformers cannot read the folder, None for a framework whose own loader reads the
    folder (keras-hub), an error for PyTorch."""
    # never reach for a hub: the folder is all (set before transformers is imported, which
    # reads it once)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("transformers") is None:
        if framework == "torch":
            raise LayerscopeError(
                "loading a Hugging Face folder in PyTorch needs transformers: "
                "pip install 'layerscope[torch]'"
            )
        return None
    if framework == "torch":
        return read_architecture(folder)
    try:
        return read_architecture(folder)
    except LayerscopeError:  # the framework's own loader reads the folder, and says why not
        return None


def read_architecture(folder: Path) -> Architecture:
    """The architecture ``folder/config.json`` names, checked against the installed
    transformers (offline: only the folder is read)."""
    raw = _read_config_json(folder)
    if "auto_map" in raw:
        raise LayerscopeError(
            f"{folder} needs its own Python code (config.json has auto_map), which the CLI does "
            "not run; load it in Python (trust_remote_code=True) and pass module:factory"
        )
    config = _auto_config(folder, raw)
    cls = _named_class(config) or _class_for_model_type(config)
    if cls is None:
        raise LayerscopeError(
            f"{folder}: transformers has no model class for model_type "
            f"{config.model_type!r}; load the model in Python and pass module:factory"
        )
    main_input = str(getattr(cls, "main_input_name", "input_ids"))
    kind = _kind(config, main_input)
    start = _decoder_start_token_id(folder, config) if kind == SEQ2SEQ else None
    return Architecture(folder, cls.__name__, kind, main_input, start)


def _read_config_json(folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerscopeError(
            f"cannot read {folder / 'config.json'}: {type(exc).__name__}: {exc}; "
            "a Hugging Face folder needs a readable JSON config"
        ) from exc
    if not isinstance(raw, dict):
        raise LayerscopeError(f"{folder / 'config.json'} is not a JSON object; fix or replace it")
    return raw


def _auto_config(folder: Path, raw: dict[str, Any]) -> Any:
    import transformers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        named = raw.get("architectures") or raw.get("model_type") or "none named"
        raise LayerscopeError(
            f"unknown architecture in {folder} ({named}): transformers "
            f"{transformers.__version__} cannot read its config.json; upgrade transformers, or "
            "load the model in Python and pass module:factory"
        ) from exc


def _named_class(config: Any) -> Any:
    """The first class of ``config.architectures`` that transformers exports."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        try:
            cls = getattr(transformers, str(name), None) if str(name).isidentifier() else None
        except (ImportError, RuntimeError):  # a class whose optional dependency is missing
            cls = None
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return None


def _class_for_model_type(config: Any) -> Any:
    """A config that names no known class: the class with the head its model type is usually
    saved with (``AutoModelForSeq2SeqLM``, ``AutoModelForCausalLM``,
    ``AutoModelForImageClassification``), else the bare model (``AutoModel``). Types that are
    masked LMs too (BERT, RoBERTa) get the bare model: their causal head is a rarity."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    model_type = config.model_type
    mappings: list[Mapping[str, Any]] = [auto.MODEL_MAPPING_NAMES]
    if model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        mappings.insert(0, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if getattr(config, "is_encoder_decoder", False):
        mappings.insert(0, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    mappings.insert(-1, auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    for mapping in mappings:
        names = mapping.get(model_type)
        for name in (names,) if isinstance(names, str) else names or ():
            cls = getattr(transformers, name, None)
            if isinstance(cls, type):
                return cls
    return None


def _kind(config: Any, main_input: str) -> str:
    if main_input == "pixel_values":
        return VISION
    if main_input in _AUDIO_INPUTS:
        return AUDIO
    if any(getattr(config, name, None) is not None for name in _SUBMODEL_CONFIGS):
        return MULTIMODAL
    if main_input == "input_ids":
        return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else TEXT
    raise LayerscopeError(
        f"{type(config).__name__}: the model's main input is {main_input!r}, which the CLI "
        "cannot build; load the model in Python and call layerscope.capture with its inputs"
    )


def _decoder_start_token_id(folder: Path, config: Any) -> int | None:
    """The id the decoder starts from: config.json's, else generation_config.json's (where
    transformers 5 keeps it)."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            start = GenerationConfig.from_pretrained(str(folder)).decoder_start_token_id
        except (ValueError, OSError):
            start = None
    if isinstance(start, list):  # some generation configs hold one per language
        start = start[0] if start else None
    return None if start is None else int(start)
