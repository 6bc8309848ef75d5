"""Which sites' outputs were copied into their chunks by address, the way the trace took:
``SitePut.put_raw`` in Python, or a torch site's C hook (core/_directc.c), which takes the
common case without calling the Python."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from layerscope.backends import _torch_forward
from layerscope.backends import torch as torch_backend
from layerscope.core import direct


class AddressCopies:
    """The sites whose outputs were copied by address, one entry a copy."""

    def __init__(self) -> None:
        self.python: list[str] = []  # by SitePut.put_raw, in order
        self.hooks: list[tuple[list[Any], Any]] = []  # (the hook's by_address, its C hook)

    def in_c(self) -> list[str]:
        """The copies the C hooks made (no order between sites)."""
        return [by_address[0][0]._key[0] for by_address, hook in self.hooks
                for _ in range(hook.taken)]

    def __call__(self) -> list[str]:
        return self.python + self.in_c()


def count_address_copies(patch: Callable[[Any, str, Any], None],
                         seen: Callable[[str, bool], None] | None = None) -> AddressCopies:
    """Count the copies by address of the traces made from now on, both ways, the counts
    installed with ``patch(object, name, value)`` (``setattr`` or a monkeypatch's).
    ``seen(site, taken)``: told of each Python ``put_raw``, taken or not."""
    copies = AddressCopies()
    put_raw = direct.SitePut.put_raw

    def counted(self: direct.SitePut, *args: Any) -> bool:
        taken = put_raw(self, *args)
        if seen is not None:
            seen(self._key[0], taken)
        if taken:
            copies.python.append(self._key[0])
        return taken

    patch(direct.SitePut, "put_raw", counted)
    if torch_backend.OutputHook is not None:  # the C part built, not turned off (python_only)
        def making(python_hook: Any, capture: Any, by_address: list[Any], *rest: Any) -> Any:
            hook = direct.OutputHook(python_hook, capture, by_address, *rest)
            copies.hooks.append((by_address, hook))
            return hook

        patch(torch_backend, "OutputHook", making)
    return copies


def python_only(patch: Callable[[Any, str, Any], None]) -> None:
    """Trace torch models with the Python hooks alone, as a build without the C part does."""
    patch(torch_backend, "OutputHook", None)
    patch(_torch_forward, "Forward", None)


def take_hook_way(way: str, patch: Callable[[Any, str, Any], None]) -> None:
    """Trace torch models with the C part (``"c"``; a failure where it was not built) or
    with the Python alone (``"python"``)."""
    if way == "python":
        python_only(patch)
    elif direct.OutputHook is None or direct.Forward is None:
        if os.environ.get("LAYERSCOPE_PURE_PYTHON"):
            pytest.skip("LAYERSCOPE_PURE_PYTHON is set: the Python alone")
        pytest.fail("layerscope's C part (core/_directc.c) was not built")
