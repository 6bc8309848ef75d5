"""While a trace is open, the objects that existed before it are left out of Python's cyclic
collections (core/collector.py), and everything is as it was once the last trace closes."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import layerscope
from layerscope.core import StoreError


class Node:
    """One half of a reference cycle: reference counting alone never frees it."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A cycle of two nodes that is garbage at once; a weak reference to one of them."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture
def model():
    """A small model to trace; each test starts with nothing frozen and the collector on, and
    leaves it so."""
    gc.unfreeze()
    assert gc.isenabled()
    yield torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    gc.unfreeze()
    gc.enable()


def test_objects_from_before_a_trace_are_frozen_until_it_closes(model, tmp_path):
    first, second = Node(), Node()
    first.other, second.other = second, first
    older = weakref.ref(first)
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        assert gc.get_freeze_count() > 0
        del first, second  # garbage now, but frozen: a collection passes over it
        gc.collect()
        assert older() is not None
        made_inside = cycle()  # made while the trace is open: collected as ever
        gc.collect()
        assert made_inside() is None
        model(torch.ones(2, 4))
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert older() is None
    assert layerscope.open_trace(tmp_path / "t.zarr").sizes["batch"] == 2


def test_a_program_that_froze_objects_itself_keeps_its_freeze(model, tmp_path):
    frozen_garbage = cycle()
    gc.freeze()  # the program's own
    frozen = gc.get_freeze_count()
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        model(torch.ones(2, 4))
        assert gc.get_freeze_count() <= frozen  # nothing more (frozen objects freed leave it)
    gc.collect()
    assert frozen_garbage() is not None  # still frozen: the trace thawed nothing


def test_a_freeze_made_while_a_trace_is_open_is_thawed_with_the_traces(model, tmp_path):
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        frozen_inside = cycle()
        gc.freeze()  # the program's own, after the trace's: thawed at the close with it
        model(torch.ones(2, 4))
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert frozen_inside() is None


def test_a_collector_turned_off_is_left_alone(model, tmp_path):
    gc.disable()
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        model(torch.ones(2, 4))
        assert gc.get_freeze_count() == 0
    assert not gc.isenabled()


def test_the_freeze_lasts_until_the_last_of_two_traces_closes(model, tmp_path):
    outer = layerscope.trace(model, tmp_path / "outer.zarr")
    inner = layerscope.trace(torch.nn.Linear(4, 2).eval(), tmp_path / "inner.zarr")
    with torch.no_grad():
        outer.__enter__()
        inner.__enter__()
        outer.__exit__(None, None, None)
        assert gc.get_freeze_count() > 0
        inner.__exit__(None, None, None)
    assert gc.get_freeze_count() == 0


def test_a_trace_that_fails_to_open_or_fails_inside_leaves_nothing_frozen(model, tmp_path):
    (tmp_path / "taken").write_text("a file, not a store")
    with pytest.raises(StoreError):
        layerscope.trace(model, tmp_path / "taken").__enter__()
    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="inside"), torch.no_grad(), \
            layerscope.trace(model, tmp_path / "t.zarr"):
        model(torch.ones(2, 4))
        raise ValueError("inside the block")
    assert gc.get_freeze_count() == 0


def test_traces_on_two_threads_at_once_thaw_once_both_have_closed(model, tmp_path):
    """Each thread's trace opens and closes while the other's is open, in both orders."""
    opened, closing = threading.Barrier(2), threading.Barrier(2)
    counts, errors = {}, []

    def run(name: str, first_to_close: bool) -> None:
        try:
            net = torch.nn.Linear(4, 2).eval()
            with torch.no_grad(), layerscope.trace(net, tmp_path / f"{name}.zarr"):
                opened.wait(timeout=60)
                net(torch.ones(3, 4))
                if not first_to_close:
                    closing.wait(timeout=60)  # the other closes first
            if first_to_close:
                counts[name] = gc.get_freeze_count()  # the other still open: still frozen
                closing.wait(timeout=60)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", True)),
               threading.Thread(target=run, args=("b", False))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert counts["a"] > 0
    assert gc.get_freeze_count() == 0
    for name in "ab":
        assert layerscope.open_trace(tmp_path / f"{name}.zarr").sizes["batch"] == 3


def test_what_a_trace_makes_is_frozen_after_its_passes_1_2_4_and_thawed_at_its_close(model,
                                                                                    tmp_path):
    """Objects alive at the end of a trace's pass 1, 2, 4 ... are frozen (a cycle among
    them that becomes garbage later is collected once the trace closes); garbage made before
    such a pass ends is collected first, and objects made after pass 2 are not frozen at
    pass 3."""
    with torch.no_grad(), layerscope.trace(model, tmp_path / "t.zarr"):
        alive = Node()
        alive.other = alive
        lived, garbage = weakref.ref(alive), cycle()
        model(torch.ones(2, 4))  # pass 1
        assert garbage() is None  # collected before the freeze, not kept by it
        del alive
        gc.collect()
        assert lived() is not None  # frozen with the trace's objects
        model(torch.ones(2, 4))  # pass 2
        later = Node()
        later.other = later
        made_later = weakref.ref(later)
        model(torch.ones(2, 4))  # pass 3: no freeze
        del later
        gc.collect()
        assert made_later() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert lived() is None
    assert layerscope.open_trace(tmp_path / "t.zarr").sizes["batch"] == 6


def test_a_finalizer_that_opens_a_trace_during_the_freezes_collection(model, tmp_path):
    """The collection before a freeze runs finalizers: one that opens a stored trace (which
    takes the collector's lock) runs to its end, on the trace's thread, without waiting."""
    with torch.no_grad(), layerscope.trace(model, tmp_path / "first.zarr"):
        model(torch.ones(2, 4))
    opened: list[int] = []

    class Opener(Node):
        def __del__(self) -> None:
            opened.append(layerscope.open_trace(tmp_path / "first.zarr").sizes["batch"])

    def traced() -> None:
        with torch.no_grad(), layerscope.trace(model, tmp_path / "second.zarr"):
            gc.collect()
            first, second = Opener(), Node()
            first.other, second.other = second, first
            del first, second  # garbage in a cycle: its finalizer runs at the next collection
            model(torch.ones(2, 4))  # pass 1: a collection, then a freeze

    thresholds = gc.get_threshold()
    gc.set_threshold(1_000_000)  # no collection of the collector's own before the freeze's
    try:
        thread = threading.Thread(target=traced, daemon=True)
        thread.start()
        thread.join(timeout=60)
    finally:
        gc.set_threshold(*thresholds)
    assert not thread.is_alive(), "the finalizer waited for the collector's lock"
    assert opened == [2]
    assert layerscope.open_trace(tmp_path / "second.zarr").sizes["batch"] == 2
