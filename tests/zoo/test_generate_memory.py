"""What a traced ``generate()`` holds while it runs: a block per streamed variable waiting for
the disk at most, however long the generation and however slow the writer, with every value
still equal to one eager pass over the final sequences."""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest
import zarr

import layerscope
from layerscope.backends import _torch_generate, _torch_generate_stream
from layerscope.core import chunkwrite, hostpool
from layerscope.core.errors import WriterError

from .test_generate import FAMILIES, check_against_one_pass, generate, prompts, trace_generate


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_the_steps_wait_for_a_slow_writer_instead_of_queueing(tmp_path, monkeypatch, name):
    """Blocks of 2 positions: the prompt fills 3 of each variable at once, and each step
    another one's half; a writer far slower than the model would queue them all (the budget
    allows 64 MB). The steps wait for it instead: what waits is at most a block per streamed
    variable."""
    monkeypatch.setattr(_torch_generate_stream, "MAX_ROWS", 2)
    blocks: list[int] = []
    real_init = _torch_generate_stream.StreamedVariable.__init__

    def counted_init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        blocks.append(self.block_bytes)

    monkeypatch.setattr(_torch_generate_stream.StreamedVariable, "__init__", counted_init)
    real_write = chunkwrite.ChunkWriter.write

    def slow_write(self: Any, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.005)
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(chunkwrite.ChunkWriter, "write", slow_write)
    peaks: list[tuple[int, int]] = []  # (bytes waiting, the largest single item so far)
    real_acquire = hostpool.HostPool.acquire

    def watched_acquire(self: Any, nbytes: int) -> None:
        real_acquire(self, nbytes)
        largest = max(nbytes, peaks[-1][1]) if peaks else nbytes
        peaks.append((self.pending, largest))

    monkeypatch.setattr(hostpool.HostPool, "acquire", watched_acquire)
    family = FAMILIES[name]
    check_against_one_pass(family, *trace_generate(tmp_path, family, "sdpa", False))
    assert len(blocks) >= 8 and peaks
    bound = _torch_generate.PENDING_BLOCKS * sum(blocks)
    pending, largest = max(peaks)
    assert pending <= max(bound, largest), (pending, bound)


def test_a_disk_that_fills_while_the_steps_wait_raises_instead_of_hanging(tmp_path, monkeypatch):
    """The steps wait at the bound for a writer whose disk fills up: generate() raises the
    writer's error instead of waiting for it forever, and the store says it was aborted with
    nothing committed."""
    monkeypatch.setattr(_torch_generate_stream, "MAX_ROWS", 2)
    real_write = chunkwrite.ChunkWriter.write
    calls = [0]

    def filling_write(self: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        time.sleep(0.005)
        if calls[0] > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(chunkwrite.ChunkWriter, "write", filling_write)
    waited = []
    real_acquire = hostpool.HostPool.acquire

    def watched_acquire(self: Any, nbytes: int) -> None:
        if self.pending and self.pending + nbytes > self.bound:
            waited.append(nbytes)  # the caller waits for the writer here
        real_acquire(self, nbytes)

    monkeypatch.setattr(hostpool.HostPool, "acquire", watched_acquire)
    model = FAMILIES["llama"].build("sdpa")
    ids, mask = prompts(model.config.vocab_size)
    path = tmp_path / "full.zarr"
    raised: list[BaseException] = []

    def trace_it() -> None:
        try:
            with layerscope.trace(model, path, kinds=["output", "attention"]):
                generate(model, ids, mask, False, max_new_tokens=40)
        except BaseException as exc:  # noqa: BLE001  # looked at below
            raised.append(exc)

    thread = threading.Thread(target=trace_it, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "generate() still waits for a writer that failed"
    assert waited, "the steps never waited for the writer: the test shows nothing"
    assert raised and isinstance(raised[0], WriterError), raised
    assert "No space left" in str(raised[0])
    attrs = zarr.open_group(path, mode="r").attrs
    assert attrs["status"] == "aborted" and attrs["committed_batches"] == 0
