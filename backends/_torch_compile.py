"""``torch.compile``d models: traced through the module they wrap, run eagerly while attached.

A compiled graph does not call Python forward hooks the way eager code does: hooks added after
compiling either force recompiles (one per hooked module, soon past dynamo's recompile limit)
or are left out of a graph compiled before them. So, while a trace is attached, every compiled
function runs eagerly (``torch.compiler.set_stance("force_eager")``): the hooks fire, values
are the eager model's, and nothing is compiled or recompiled. Sites are the wrapped module's
own paths (no ``_orig_mod.`` prefix) and the model described is the wrapped module's class.
After the block the compiled graphs are used again as they were.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _optimized_module_type() -> type | None:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded by any torch.compile
    found = getattr(eval_frame, "OptimizedModule", None)
    return found if isinstance(found, type) else None


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wraps (``_orig_mod``, through any number of
    wrappings); ``model`` itself when it is not compiled."""
    optimized = _optimized_module_type()
    while optimized is not None and isinstance(model, optimized):
        original = getattr(model, "_orig_mod", None)
        if not isinstance(original, nn.Module):
            break
        model = original
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it runs compiled: ``torch.compile(module)`` or
    ``module.compile()``."""
    optimized = _optimized_module_type()
    if optimized is None:
        return False
    return any(isinstance(m, optimized) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


@contextmanager
def eager_while_attached(model: nn.Module) -> Iterator[None]:
    """Run every compiled function eagerly for the block when ``model`` is compiled (the
    stance is process-wide, like compilation itself); nothing changes otherwise."""
    if not is_compiled(model):
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
