"""Warnings that point at the user's own line, not at a layerscope or framework file.

A warning raised inside a forward hook is many frames below the line that ran the model
(torch's module machinery, transformers' wrappers, a Keras call, a JAX transform), and the
number of frames depends on the model, so no fixed ``stacklevel`` is right. :func:`warn_user`
walks out to the first frame that belongs to neither layerscope nor a framework and reports the
warning there, with that module's warning registry: a warning shows once per user line under
Python's default filter, and ``-W``/``filterwarnings`` rules on that module apply.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType

#: Top-level packages whose frames are never "the user's line".
INTERNAL_PACKAGES = frozenset({
    "layerscope",
    # frameworks and the libraries that call a model's layers
    "torch", "tensorflow", "keras", "tf_keras", "jax", "jaxlib", "flax", "optax",
    "transformers", "keras_hub", "keras_nlp", "accelerate", "torchvision", "timm",
    "sentence_transformers", "diffusers", "peft", "equinox", "haiku",
    # the data stack, which may call back into layerscope
    "xarray", "dask", "zarr", "numcodecs",
    # standard-library plumbing between a user's call and layerscope
    "contextlib", "importlib", "threading", "functools", "runpy", "concurrent", "asyncio",
    "warnings", "typing_extensions",
})


def _module_of(frame: FrameType) -> str:
    """The frame's module name; ``python -m pkg`` runs as ``__main__`` but keeps its spec."""
    spec = frame.f_globals.get("__spec__")
    name = getattr(spec, "name", None) or frame.f_globals.get("__name__")
    return name if isinstance(name, str) else ""


def is_internal(module: str) -> bool:
    # TensorFlow's autograph runs a converted copy of the user's function from a generated module
    return (module.partition(".")[0] in INTERNAL_PACKAGES
            or module.startswith("__autograph_generated_file"))


def user_frame(start: FrameType | None) -> FrameType | None:
    """The first frame from ``start`` outwards that is outside layerscope and the frameworks."""
    frame = start
    while frame is not None:
        if not is_internal(_module_of(frame)):
            return frame
        frame = frame.f_back
    return None


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` as a warning attributed to the user's line that led here.

    Where no such line exists (the ``layerscope`` CLI, a writer thread), the warning is
    attributed to the line that called this function.
    """
    caller = sys._getframe(1)
    frame = user_frame(caller) or caller
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    where = (message, category, frame.f_code.co_filename, frame.f_lineno,
             module_globals.get("__name__", "<unknown>"), registry)
    try:  # module_globals lets the warning show the source line, through the module's loader
        warnings.warn_explicit(*where, module_globals=module_globals)
    except ImportError:  # `python -c` and the REPL: __main__'s loader has no source to give
        warnings.warn_explicit(*where)
