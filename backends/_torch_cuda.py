"""Device-to-host copies of captured CUDA tensors that the model's stream never waits for.

At hook time a captured tensor is cloned on the model's own stream (a device-to-device copy,
cheap next to the device-to-host one, and ordered before any later in-place op of the model
such as ``ReLU(inplace=True)``), and the clone is copied into a pinned host buffer on a side
stream that first waits for the model's stream to reach that point. The model's stream never
waits for the side stream, nor the host for either: the hook returns once the copy is queued.
A writer thread waits on the copy's event before it reads the buffer (:func:`host_array`).

A bfloat16 tensor is widened to float32 by that device-to-device copy, as every dtype NumPy
lacks is stored (:mod:`._torch_dtypes`): on the device the widening costs microseconds and
takes no host CPU from the writer threads; the copy off the device then moves twice the
bytes, well within what the link carries (on an H200, 27.4 against 29.4 ms a batch for
widening on the host: benchmarks/README.md, "GPU capture").

Pinned buffers come from a :class:`PinnedPool` and are reused batch after batch. A buffer goes
back to the pool when nothing refers to its copy any more (the writer dropped the task and
every NumPy view of it), and is handed out again only once its copy's event has completed: the
copy of a batch discarded before the writer waited on it may still be queued on one device's
side stream, and the buffer's next copy may run on another device's, in either order.

Every CUDA call goes through :class:`CudaOps`, so tests run this logic on CPU with a fake.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch

from ._torch_dtypes import stored_dtype, widened

#: free pinned bytes kept for the next batch while a trace is attached (the writer's budget
#: bounds what is in use; this bounds what waits to be reused)
KEEP_BYTES = 1 << 30


class Event(Protocol):
    def record(self, stream: Any) -> None: ...
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class CudaOps(Protocol):
    """The stream, event and memory operations a copy needs."""

    def current_stream(self, device: torch.device) -> Any: ...
    def new_stream(self, device: torch.device) -> Any: ...
    def new_event(self, blocking: bool) -> Event: ...
    def wait(self, stream: Any, event: Event) -> None:
        """``stream`` runs nothing queued after this until ``event`` has completed."""
    def copy(self, host: torch.Tensor, source: torch.Tensor, stream: Any) -> None:
        """Queue ``host.copy_(source)`` on ``stream``; ``source``'s memory stays allocated
        until ``stream`` has run it."""
    def pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 host tensor of ``nbytes``."""


class TorchCuda:
    """:class:`CudaOps` by ``torch.cuda``."""

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def new_event(self, blocking: bool) -> Event:
        # blocking: a writer thread waiting on it sleeps instead of spinning a core the
        # model's own thread needs to launch kernels
        return torch.cuda.Event(blocking=blocking)

    def wait(self, stream: Any, event: Event) -> None:
        stream.wait_event(event)

    def copy(self, host: torch.Tensor, source: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            host.copy_(source, non_blocking=True)
        # the caching allocator would otherwise hand the clone's memory to the model's stream
        # as soon as it is dropped, possibly before the side stream has read it
        source.record_stream(stream)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedPool:
    """Pinned host buffers by size, reused once the copy that last filled them completed."""

    def __init__(self, ops: CudaOps, keep_bytes: int = KEEP_BYTES) -> None:
        self.ops = ops
        self.keep_bytes = keep_bytes
        self.made = 0  # buffers allocated so far
        self._free: defaultdict[int, list[tuple[torch.Tensor, Event]]] = defaultdict(list)
        self._free_bytes = 0
        self._users = 0  # attached traces; with none, buffers given back are dropped
        self._lock = threading.RLock()  # a finalizer may give a buffer back on any thread

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            spare = self._free.get(nbytes, [])
            for index, (buffer, event) in enumerate(spare):
                if event.query():
                    del spare[index]
                    self._free_bytes -= nbytes
                    return buffer
            self.made += 1
        return self.ops.pinned(nbytes)

    def give(self, buffer: torch.Tensor, event: Event) -> None:
        """``buffer``, last filled by the copy that records ``event``, is free once it completed."""
        nbytes = buffer.numel()
        with self._lock:
            if self._users == 0 or self._free_bytes + nbytes > self.keep_bytes:
                return  # dropped: torch's own pinned allocator waits for the copy before reuse
            self._free[nbytes].append((buffer, event))
            self._free_bytes += nbytes

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Keep free buffers while the block runs; drop them when the last such block ends."""
        with self._lock:
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._free.clear()
                    self._free_bytes = 0


class DeviceCopy:
    """A captured tensor on its way to pinned host memory; NumPy views of it keep it alive."""

    def __init__(self, host: torch.Tensor, done: Event) -> None:
        self.host = host  # a view of the pool's buffer
        self.done = done
        self.shape = tuple(host.shape)
        self.dtype = host.dtype
        self.nbytes = host.numel() * host.element_size()

    def wait(self) -> None:
        self.done.synchronize()

    @property
    def __array_interface__(self) -> dict[str, Any]:
        # an array made from this object holds it as its base, so the buffer goes back to the
        # pool only after the last view of it is gone
        dtype = stored_dtype(self.dtype)
        assert dtype is not None  # only storable tensors are copied (the capture skips others)
        return {"data": (self.host.data_ptr(), False), "shape": self.shape,
                "typestr": dtype.str, "version": 3}


def host_array(copy: DeviceCopy) -> np.ndarray:
    """The copied values as NumPy, once the copy completed (called on a writer thread)."""
    copy.wait()
    return np.asarray(copy)


class DeviceCopies:
    """Queues copies of device tensors on one side stream per device."""

    def __init__(self, ops: CudaOps, keep_bytes: int = KEEP_BYTES) -> None:
        self.ops = ops
        self.pool = PinnedPool(ops, keep_bytes)
        self._streams: dict[torch.device, Any] = {}
        self._lock = threading.Lock()

    def copy(self, tensor: torch.Tensor) -> DeviceCopy:
        ops = self.ops
        model_stream = ops.current_stream(tensor.device)
        # on the model's stream; a new tensor whatever the dtype, so that a later in-place
        # op of the model cannot reach it
        frozen = tensor.to(dtype=widened(tensor.dtype), memory_format=torch.contiguous_format,
                           copy=True)
        ready = ops.new_event(blocking=False)
        ready.record(model_stream)
        side = self._side_stream(tensor.device)
        ops.wait(side, ready)  # the side stream waits for the model's, never the other way
        nbytes = frozen.numel() * frozen.element_size()
        buffer = self.pool.take(nbytes)
        host = buffer[:nbytes].view(frozen.dtype).view(frozen.shape)
        ops.copy(host, frozen, side)
        done = ops.new_event(blocking=True)
        done.record(side)
        held = DeviceCopy(host, done)
        weakref.finalize(held, self.pool.give, buffer, done)
        return held

    def _side_stream(self, device: torch.device) -> Any:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = self.ops.new_stream(device)
            return stream


#: the process's copies: side streams and pinned buffers are made on first use, so a trace
#: that never meets a CUDA tensor never initialises CUDA
COPIES = DeviceCopies(TorchCuda())
