"""What the child process of a kill test runs to die at a chosen moment (the tests put this
folder on the child's ``sys.path``)."""

from __future__ import annotations

import os
import signal
from typing import Any


def killing(owner: Any, name: str, nth: int) -> None:
    """Replace ``owner.name`` by a wrapper that SIGKILLs this process at its ``nth`` call."""
    original = getattr(owner, name)
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)
