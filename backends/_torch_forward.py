"""A site's output hook run inside the module's ``forward`` instead of as a forward hook.

A module with any forward hook leaves ``nn.Module._call_impl``'s fast path for its general
one (the hook dictionaries walked, the hooks' arguments built): about 2 us a module, 3-4 ms a
batch of a model traced at 1,601 modules whose plain forward takes 23 ms. A module with
none of its own and no global forward hook is given its output hook this way instead:
``module.forward`` becomes a wrapper that calls the forward it found (the class's, or an
instance's own, such as accelerate's) and then the hook with the same ``(module, args,
kwargs, output)`` a forward hook gets. The hook still sees what a forward hook registered
now would see: the module's pre-hooks have run, and a forward hook the user adds to the
module inside the trace runs after it, as it would after a hook registered first. One
difference is left: a global forward hook added inside the trace runs after it too, where
torch runs global hooks before a module's own.

Where the C part is built (core/_directc.c), the wrapper is its ``Forward``, which takes the
direct way's common case (:data:`.direct.OutputHook`) without a Python call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from layerscope.core.direct import Forward

_NONE = object()  # the module had no ``forward`` of its own


def wraps_forwards(model: nn.Module) -> bool:
    """Whether the hooks of ``model``'s modules may run inside their ``forward``: not under
    an ``nn.DataParallel``, whose replicas copy each module's attributes, a wrapper with
    them, which would run the original module's ``forward`` on another device's inputs."""
    return not any(isinstance(module, nn.DataParallel) for module in model.modules())


def wrappable(module: nn.Module, root: nn.Module) -> bool:
    """Whether ``module``'s output hook may run inside its ``forward``: no forward hook of
    its own or a global one would then run before the hook instead of after it (one that
    changes the output would change what is stored); not the root, whose pass-end hook
    keeps it on the general path anyway; not a scripted module, whose attributes are
    TorchScript's."""
    return module is not root and not module._forward_hooks \
        and not torch_module._global_forward_hooks \
        and not isinstance(module, torch.jit.ScriptModule)


def _python_forward(forward: Callable[..., Any], module: nn.Module,
                    hook: Callable[..., None]) -> tuple[Callable[..., Any], Callable[[], None]]:
    """The wrapper without the C part, and what turns its hook off."""
    live: list[Callable[..., None] | None] = [hook]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        current = live[0]
        if current is not None:
            current(module, args, kwargs, output)
        return output

    wrapper.__wrapped__ = forward  # type: ignore[attr-defined]  # inspect.signature reads it

    def off() -> None:
        live[0] = None

    return wrapper, off


class ForwardHook:
    """``hook`` run inside ``module.forward`` (see the module's docstring) until
    :meth:`remove`, a handle as ``register_forward_hook`` returns one."""

    def __init__(self, module: nn.Module, hook: Callable[..., None]) -> None:
        self.module = module
        self._own = module.__dict__.get("forward", _NONE)
        if Forward is not None:
            wrapper = Forward(module.forward, module, hook)
            self.wrapper, self._off = wrapper, lambda: setattr(wrapper, "hook", None)
        else:
            self.wrapper, self._off = _python_forward(module.forward, module, hook)
        module.forward = self.wrapper

    def remove(self) -> None:
        """Give the module its ``forward`` back. Where something wrapped it again meanwhile
        (accelerate's hooks added inside the trace), the wrapper stays in that chain and
        only passes calls through: taking it out would drop theirs."""
        self._off()
        own = self.module.__dict__
        if own.get("forward") is self.wrapper:
            if self._own is _NONE:
                del own["forward"]
            else:
                own["forward"] = self._own
