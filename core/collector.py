"""Python's cyclic garbage collector while a trace is open.

A trace of a model at thousands of sites makes tens of thousands of objects that live as long
as the trace (its variables, their chunks and slots), most of them in its first batch. That
many survivors set off full collections, and each full collection walks every object in the
process: the model's modules, torch's, what the user's program holds. On a 1,601-variable
model a full collection took 117-154 ms, two of them in a 20-batch trace's first batches
(benchmarks/README.md, "Many captured sites": a 20-batch trace took 7-15% less time, a
one-batch trace 23-36% less, with the objects that existed before the trace frozen).

So while a trace is open, the objects that existed when it opened are frozen
(:func:`gc.freeze`): collections look at what was made since, and nothing else changes (what
reference counting frees is freed as before; a cycle among the frozen objects that becomes
garbage is collected once the trace closes). Where the program froze objects itself, or turned
the collector off, nothing is done. What a program freezes while a trace is open is thawed
with the trace's objects when it closes: telling the two apart would count the frozen objects,
a walk over all of them at each end of every trace (0.7-9 ms for 209,000 objects); a program
that freezes objects does it before it opens a trace, as a server does before it forks.

``open_trace`` does the same while it makes a dataset: a store of 2,000 variables is tens of
thousands of objects that all live on. Unlike pausing the collector, which only moves the
collections to the program's next allocations, this leaves nothing owed: the collections run,
over the new objects only (benchmarks/README.md, "Many captured sites").
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_open = 0  # traces open in this process
_froze = False  # whether the first of them froze the objects older than it


@contextmanager
def older_objects_frozen() -> Iterator[None]:
    """For the block: the objects that existed when the process's first open trace began are
    left out of collections (see the module's description)."""
    global _open, _froze
    with _lock:
        # counting frozen objects walks them: 0 is told at once, and so is "some"
        if _open == 0 and gc.isenabled() and gc.get_freeze_count() == 0:
            gc.freeze()
            _froze = True
        _open += 1
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0 and _froze:
                gc.unfreeze()
                _froze = False
