"""Python's cyclic garbage collector while a trace is open.

A trace of a model at thousands of sites makes tens of thousands of objects that live as long
as the trace (its variables, their chunks and slots), most of them in its first batch. That
many survivors set off full collections, and each full collection walks every object in the
process: the model's modules, torch's, what the user's program holds. On a 1,601-variable
model a full collection took 117-154 ms, two of them in a 20-batch trace's first batches
(benchmarks/README.md, "Many captured sites": a 20-batch trace took 15% less time, a one-batch
trace 36% less, with the objects that existed before the trace frozen).

So while a trace is open, the objects that existed when it opened are frozen
(:func:`gc.freeze`): collections look at what was made since, and nothing else changes (what
reference counting frees is freed as before; a cycle among the frozen objects that becomes
garbage is collected once the trace closes). Where the program froze objects itself, or turned
the collector off, nothing is done; a program that freezes objects while a trace is open
keeps its freeze (and the trace's) after the trace closes.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_open = 0  # traces open in this process
_frozen: int | None = None  # objects frozen by the first of them; None: it froze nothing


@contextmanager
def older_objects_frozen() -> Iterator[None]:
    """For the block: the objects that existed when the process's first open trace began are
    left out of collections (see the module's description)."""
    global _open, _frozen
    with _lock:
        if _open == 0 and gc.isenabled() and gc.get_freeze_count() == 0:
            gc.freeze()
            _frozen = gc.get_freeze_count()
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            # frozen objects freed meanwhile leave the count: more than it was means that the
            # program froze objects itself since, and those stay frozen
            if _open == 0 and _frozen is not None:
                if gc.get_freeze_count() <= _frozen:
                    gc.unfreeze()
                _frozen = None
