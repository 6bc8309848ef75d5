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

The objects a trace makes for as long as it lives (its variables and slots in its first
batch, its arrays and their chunks once its first groups are committed) are frozen too, as the
trace goes on: after its passes 1, 2, 4 ... 64 (:func:`freeze_trace_objects`), each time after
a collection of the young generations (what is garbage by then is not kept). Unfrozen, they
set off a full collection every thirty batches or so of a 1,601-variable model, 22-37 ms each,
about 1 ms a batch (benchmarks/README.md, "Many captured sites"). Cyclic garbage those
collections do not reach (in the oldest generation at a freeze) is kept until the last trace
closes.

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


#: the passes of a trace after which the objects made so far are frozen: its first batch makes
#: its variables, its first groups' commits make its arrays (see the module's description)
FREEZE_AFTER = frozenset(1 << power for power in range(7))


def freeze_trace_objects(passes: int) -> None:
    """After a trace's pass number ``passes`` (counted from 1): where it is one of
    :data:`FREEZE_AFTER` and the traces froze the older objects, freeze what was made since,
    once the young generations' garbage is collected."""
    if passes not in FREEZE_AFTER or not _froze or not gc.isenabled():
        return
    gc.collect(1)  # not under the lock: a finalizer it runs may open or close a trace
    with _lock:
        if _froze and gc.isenabled():  # the last trace may have closed meanwhile
            gc.freeze()
