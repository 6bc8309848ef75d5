"""The CUDA capture path's ordering, on CPU: a fake device stands in for ``torch.cuda``.

The fake runs the model's stream eagerly (as the CPU does) and holds the side stream's work
until something waits for it, the way a busy GPU would: a copy read before its event
completed shows the pinned buffer's old bytes (NaN), never the tensor. The checks: the copy
is queued on the side stream, which waits for the model's stream and never the other way;
the writer thread waits on the copy's event before it reads; a buffer is reused only once its
copy's event completed and nothing refers to it; an in-place op of the model after the hook
does not reach the stored values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import layerscope
from layerscope.backends import _torch_cuda
from layerscope.backends import torch as torch_backend
from layerscope.backends._torch_cuda import DeviceCopies, host_array
from layerscope.core import StoreOptions
from layerscope.core.direct import SitePut
from layerscope.core.gather import GatherPolicy

STALE = 0xFF  # a fresh pinned buffer's bytes: NaN in every float dtype


class FakeStream:
    def __init__(self, name: str, eager: bool) -> None:
        self.name = name
        self.eager = eager  # the model's stream: its work is done when queued


class FakeEvent:
    def __init__(self, device: FakeCuda, blocking: bool) -> None:
        self.device = device
        self.blocking = blocking
        self.done = False

    def record(self, stream: FakeStream) -> None:
        self.done = False
        self.device.log.append(("record", stream.name, self))
        self.device.enqueue(stream, self._complete)

    def _complete(self) -> None:
        self.done = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.device.log.append(("synchronize", threading.current_thread().name, self))
        self.device.run_until(lambda: self.done)
        assert self.done, "an event waited on that was never recorded"


class FakeCuda:
    """:class:`~layerscope.backends._torch_cuda.CudaOps` on CPU, with a side stream that
    runs only when something waits for it."""

    def __init__(self) -> None:
        self.model = FakeStream("model", eager=True)
        self.pending: list[Callable[[], None]] = []  # the side stream's queue
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, Any]] = []
        self.streams: list[FakeStream] = []
        self.in_flight: dict[int, int] = {}  # host address -> copies into it not yet run

    def enqueue(self, stream: FakeStream, work: Callable[[], None]) -> None:
        if stream.eager:
            work()
        else:
            with self.lock:
                self.pending.append(work)

    def run_until(self, finished: Callable[[], bool]) -> None:
        with self.lock:
            while self.pending and not finished():
                self.pending.pop(0)()

    def run_side(self) -> None:
        self.run_until(lambda: False)

    # -- CudaOps -----------------------------------------------------------------------------

    def current_stream(self, device: torch.device) -> FakeStream:
        return self.model

    def new_stream(self, device: torch.device) -> FakeStream:
        stream = FakeStream(f"side{len(self.streams)}", eager=False)
        self.streams.append(stream)
        return stream

    def new_event(self, blocking: bool) -> FakeEvent:
        return FakeEvent(self, blocking)

    def wait(self, stream: FakeStream, event: FakeEvent) -> None:
        self.log.append(("wait", stream.name, event))

        def check() -> None:  # the side stream's work after this runs only once it is done
            assert event.done

        self.enqueue(stream, check)

    def copy(self, host: torch.Tensor, source: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("copy", stream.name, source))
        address = host.data_ptr()
        self.in_flight[address] = self.in_flight.get(address, 0) + 1

        def run() -> None:
            host.copy_(source)  # holds source, as record_stream does
            self.in_flight[address] -= 1

        self.enqueue(stream, run)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.full((nbytes,), STALE, dtype=torch.uint8)

    # -- what the log says -------------------------------------------------------------------

    def entries(self, what: str) -> list[tuple[str, str, Any]]:
        return [entry for entry in self.log if entry[0] == what]


@pytest.fixture
def fake() -> FakeCuda:
    return FakeCuda()


@pytest.fixture
def copies(fake: FakeCuda) -> DeviceCopies:
    return DeviceCopies(fake)


def test_copy_runs_on_the_side_stream_and_is_read_after_its_event(fake, copies):
    tensor = torch.randn(4, 3, 5)
    held = copies.copy(tensor.permute(0, 2, 1))  # not contiguous, as a batch-first permute
    assert torch.isnan(held.host).all()  # queued, not run: the side stream is busy
    [wait] = fake.entries("wait")
    [copy] = fake.entries("copy")
    assert wait[1] == copy[1] == "side0"
    assert all(name != "model" for _, name, _ in fake.entries("wait"))
    assert not fake.entries("synchronize")  # nothing waited on the host either

    values = host_array(held)
    np.testing.assert_array_equal(values, tensor.permute(0, 2, 1).numpy())
    [(_, _, waited)] = fake.entries("synchronize")
    assert waited is held.done and waited.blocking  # the reader sleeps, it does not spin


def test_bfloat16_is_widened_on_the_device_and_read_as_float32_exactly(copies):
    tensor = torch.randn(3, 7).to(torch.bfloat16)
    held = copies.copy(tensor)
    assert held.dtype == torch.float32 and held.nbytes == tensor.numel() * 4
    values = host_array(held)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, tensor.float().numpy())


def test_an_in_place_op_after_the_hook_does_not_reach_the_copy(copies):
    """The model goes on and changes the tensor in place (``ReLU(inplace=True)``) before the
    side stream has copied it: the copy reads the clone made on the model's stream."""
    tensor = torch.randn(2, 6)
    before = tensor.clone()
    held = copies.copy(tensor)
    tensor.relu_()
    np.testing.assert_array_equal(host_array(held), before.numpy())


def test_a_buffer_is_reused_only_after_its_event_and_its_last_view(fake, copies):
    with copies.pool.in_use():
        first = copies.copy(torch.randn(8, 4))
        first_buffer = first.host.data_ptr()
        del first  # a discarded batch: dropped before anything waited for its copy
        second = copies.copy(torch.randn(8, 4))
        assert second.host.data_ptr() != first_buffer  # its copy may still be in flight
        fake.run_side()  # both copies complete
        del second
        third = copies.copy(torch.randn(8, 4))
        assert copies.pool.made == 2  # a buffer of the two, reused

        # a NumPy view of a completed copy keeps its buffer from the pool
        expected = torch.randn(8, 4)
        view = host_array(copies.copy(expected))
        fourth = copies.copy(torch.full((8, 4), 7.0))
        assert fourth.host.data_ptr() != view.ctypes.data
        fake.run_side()
        np.testing.assert_array_equal(view, expected.numpy())
        del third, fourth
    made = copies.pool.made
    copies.copy(torch.randn(8, 4))
    assert copies.pool.made == made + 1  # the free buffers went when the last trace ended


def test_buffers_given_back_outside_a_trace_are_not_kept(fake, copies):
    held = copies.copy(torch.randn(5))
    fake.run_side()
    del held
    copies.copy(torch.randn(5))
    assert copies.pool.made == 2


class Blocks(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6, dtype=dtype) for _ in range(3))
        self.act = nn.ReLU(inplace=True)  # changes the block's output after its hook ran

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.act(block(x))
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trace_through_the_side_stream(tmp_path, monkeypatch, fake, dtype):
    """A whole trace with every captured tensor sent down the (fake) CUDA path: the writer
    threads wait on the events and store the values bit for bit; the model's thread never
    waits on an event, and the model's stream never waits at all; buffers are reused."""
    copies = DeviceCopies(fake)
    fake_cuda_path(monkeypatch, copies)
    torch.manual_seed(0)
    model = Blocks(dtype).eval()
    inputs = [torch.randn(4, 5, 6, dtype=dtype) for _ in range(5)]
    expected: dict[str, list[torch.Tensor]] = {f"blocks.{i}": [] for i in range(3)}
    with torch.no_grad():
        for x in inputs:
            h = x
            for index, block in enumerate(model.blocks):
                h = block(h)
                expected[f"blocks.{index}"].append(h.clone())  # before the in-place ReLU
                h = h.relu()

    path = tmp_path / "t.zarr"
    # a one-byte budget: each put waits for the writer to finish the one before; small
    # variables not gathered (a writer's first batch holds those until it decides whether to
    # gather them, outside the budget: tests/core/test_gather.py)
    options = StoreOptions(max_pending_bytes=1, gathering=GatherPolicy(enabled=False))
    with layerscope.trace(model, path, "blocks.*", options=options), torch.no_grad():
        for x in inputs:
            model(x)
    ds = layerscope.open_trace(path)
    for site, values in expected.items():
        np.testing.assert_array_equal(ds[f"{site}@output"].values,
                                      torch.cat(values).float().numpy(), err_msg=site)

    model_thread = threading.current_thread().name
    waiting_threads = [thread for _, thread, _ in fake.entries("synchronize")]
    assert len(waiting_threads) == 3 * len(inputs)  # each copy waited on once, by the writer
    assert model_thread not in waiting_threads
    assert {stream for _, stream, _ in fake.entries("wait")} == {"side0"}
    # the three outputs have one size; the budget lets one wait while the next is copied
    assert copies.pool.made <= 2


# -- faults: the device fails under a copy, the user interrupts a pass with copies in flight --


def fake_cuda_path(monkeypatch: pytest.MonkeyPatch, copies: DeviceCopies) -> None:
    """Every captured tensor down the fake CUDA path. CPU tensors stand in for a device's,
    on the labeled way (``snapshot``) and on the direct way of later passes alike."""
    monkeypatch.setattr(_torch_cuda, "COPIES", copies)
    monkeypatch.setattr(torch_backend, "snapshot",
                        lambda tensor, alloc=None: copies.copy(tensor.detach()))
    monkeypatch.setattr(torch_backend, "_on_device", lambda tensor: True)


@pytest.mark.parametrize("gathered", [False, True])
def test_after_its_first_passes_a_device_tensor_skips_the_labeling(tmp_path, monkeypatch, fake,
                                                                    gathered):
    """A site whose variable is settled takes its next device tensors the direct way: the
    copy off the device is queued for the writer, none of the labeling run again (on a GPU
    whose forward is bound by kernel launches, a third of a hook's cost). A gathered
    variable (small tensors, placed in chunk memory) still goes the labeled way. Values
    exact either way, an in-place op after each hook notwithstanding."""
    copies = DeviceCopies(fake)
    fake_cuda_path(monkeypatch, copies)
    labeled: list[int] = []  # the pass of each labeled put
    passes = [0]
    put = torch_backend._Capture.put

    def counted(self: Any, site: str, kind: str, *rest: Any, **kw: Any) -> None:
        labeled.append(passes[0])
        put(self, site, kind, *rest, **kw)

    monkeypatch.setattr(torch_backend._Capture, "put", counted)
    torch.manual_seed(0)
    model = Blocks(torch.float32).eval()
    inputs = [torch.randn(4, 5, 6) for _ in range(5)]
    with torch.no_grad():
        expected = []
        for x in inputs:
            expected.append(model.blocks[0](x).clone())
    path = tmp_path / "t.zarr"
    options = StoreOptions(gathering=GatherPolicy(enabled=gathered, min_variables=1, batches=2))
    with layerscope.trace(model, path, "blocks.*", options=options), torch.no_grad():
        for index, x in enumerate(inputs):
            passes[0] = index
            model(x)
    ds = layerscope.open_trace(path)
    assert (ds["blocks.0@output"].attrs.get("gathered_batches") is not None) == gathered
    np.testing.assert_array_equal(ds["blocks.0@output"].values, torch.cat(expected).numpy())
    assert len(fake.entries("copy")) == 3 * len(inputs)  # every tensor went off the "device"
    if gathered:
        assert labeled.count(4) == 3
    else:
        assert set(labeled) == {0}, labeled  # from the second pass on, none
    model_thread = threading.current_thread().name
    waits = [thread for _, thread, _ in fake.entries("synchronize")].count(model_thread)
    # gathering is decided at the first batch's end, which places that batch's rows itself
    assert waits == (3 if gathered else 0)


class Tokens(nn.Module):
    """Token ids -> (batch, token, hidden) blocks: passes of several lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def test_shorter_passes_take_the_direct_way_off_the_device_and_are_filled(tmp_path,
                                                                           monkeypatch, fake):
    """A pass shorter along the token axis than the store's goes the direct way too (its
    copy off the device queued as it is), and reads back filled past its length."""
    copies = DeviceCopies(fake)
    fake_cuda_path(monkeypatch, copies)
    held: list[bool] = []
    put_held = SitePut.put_held

    def counted(self: SitePut, *args: Any) -> bool:
        held.append(put_held(self, *args))
        return held[-1]

    monkeypatch.setattr(SitePut, "put_held", counted)
    torch.manual_seed(0)
    model = Tokens().eval()
    lengths = [5, 5, 3, 5, 2, 5]
    inputs = [torch.randint(0, 20, (4, n)) for n in lengths]
    with torch.no_grad():
        expected = [model.blocks[0](model.embed(ids)).numpy() for ids in inputs]
    path = tmp_path / "v.zarr"
    with layerscope.trace(model, path, "blocks.*"), torch.no_grad():
        for ids in inputs:
            model(input_ids=ids)
    stored = layerscope.open_trace(path)["blocks.0@output"]
    assert stored.dims == ("batch", "token", "hidden") and stored.shape == (24, 5, 6)
    assert held == [True] * 3 * (len(inputs) - 1)
    values = stored.values
    for index, (length, own) in enumerate(zip(lengths, expected, strict=True)):
        rows = values[4 * index:4 * index + 4]
        np.testing.assert_array_equal(rows[:, :length], own)
        assert np.isnan(rows[:, length:]).all()


def test_a_device_error_at_the_event_surfaces_in_the_caller(tmp_path, monkeypatch, fake):
    """CUDA reports an asynchronous error (an illegal memory access) where the writer waits
    on a copy: the caller gets a WriterError, the store ends aborted, and the batches
    committed before it hold their values."""
    copies = DeviceCopies(fake)
    fake_cuda_path(monkeypatch, copies)
    waited = 0
    synchronize = FakeEvent.synchronize

    def failing(self: FakeEvent) -> None:
        nonlocal waited
        waited += 1
        if waited > 6:  # the copies of batches 0 and 1 arrive; the first of batch 2 fails
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        synchronize(self)

    monkeypatch.setattr(FakeEvent, "synchronize", failing)
    torch.manual_seed(0)
    model = Blocks(torch.float32).eval()
    inputs = [torch.randn(4, 5, 6) for _ in range(5)]
    path = tmp_path / "t.zarr"
    with pytest.raises(layerscope.WriterError, match="illegal memory access"):
        with layerscope.trace(model, path, "blocks.*", options=StoreOptions(max_pending_bytes=1)), \
                torch.no_grad():
            for x in inputs:
                model(x)
    with pytest.warns(UserWarning, match="aborted"):
        ds = layerscope.open_trace(path)
    committed = ds.attrs["committed_batches"]
    assert ds.attrs["status"] == "aborted" and 1 <= committed <= 2
    with torch.no_grad():
        first = model.blocks[0](torch.cat(inputs[:committed]))
    np.testing.assert_array_equal(ds["blocks.0@output"].values, first.numpy())


def test_failed_passes_leave_their_copies_behind_safely(tmp_path, monkeypatch, fake):
    """Passes that raise half-way, the user going on in the same trace: each is discarded
    when the next begins, the copies the writer had not reached dropped without a wait. No
    buffer whose copy is still queued is handed out again, and the passes that completed are
    stored exactly."""
    copies = DeviceCopies(fake)
    fake_cuda_path(monkeypatch, copies)
    take = copies.pool.take
    reused = 0

    def checked_take(nbytes: int) -> torch.Tensor:
        nonlocal reused
        made = copies.pool.made
        buffer = take(nbytes)
        reused += copies.pool.made == made
        assert not fake.in_flight.get(buffer.data_ptr()), "a buffer with a copy still queued"
        return buffer

    monkeypatch.setattr(copies.pool, "take", checked_take)
    torch.manual_seed(0)
    model = Blocks(torch.float32).eval()
    inputs = [torch.randn(4, 5, 6) for _ in range(6)]
    failing = [False]

    def fail(module: nn.Module, args: Any, output: Any) -> None:
        if failing[0]:
            raise RuntimeError("a bad batch")

    model.blocks[2].register_forward_hook(fail)
    completed = []
    # a one-byte budget: each put waits for the writer to be done with the one before, so
    # the pool has buffers back to hand out again (else how many it reuses is a race with
    # the writer); small variables not gathered (a writer's first batch holds their copies
    # until it decides whether to gather them: tests/core/test_gather.py)
    options = StoreOptions(max_pending_bytes=1, gathering=GatherPolicy(enabled=False))
    with layerscope.trace(model, tmp_path / "t.zarr", "blocks.*", options=options), \
            torch.no_grad():
        for number, x in enumerate(inputs):
            failing[0] = number % 2 == 1
            try:
                model(x)
                completed.append(x)
            except RuntimeError:
                pass
    assert reused  # the pool did hand buffers out again
    ds = layerscope.open_trace(tmp_path / "t.zarr")
    assert ds.attrs["committed_batches"] == len(completed) == 3
    with torch.no_grad():
        expected = model.blocks[1](model.blocks[0](torch.cat(completed)).relu())
    np.testing.assert_array_equal(ds["blocks.1@output"].values, expected.numpy())
