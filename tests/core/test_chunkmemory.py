"""Gathered chunks' memory shared with the chunk-writing process (core/chunkmemory.py): what a
request names is found by the process, byte for byte, and a trace whose chunks lie there sends
none of their bytes down the pipe."""

from __future__ import annotations

import os

import numpy as np
import pytest

import layerscope
from layerscope.core import chunkmemory, chunkproc, gatherwrite
from layerscope.core._chunk_child import MemoryFile
from layerscope.core.chunkmemory import ChunkArena
from layerscope.core.gather import GatherPolicy

from .test_gather import snapshot
from .test_writer import make_recorder


def test_the_process_reads_each_buffer_where_it_lies():
    arena = ChunkArena()
    try:
        sizes = (100, 5000, 1 << 20, 3 << 20, chunkmemory.SLAB + 1, 7, 160 << 10)
        buffers = [arena.take(size) for size in sizes]
        process = MemoryFile(arena.fd)
        assert bytes(process.view(0, 0)) == b""  # an empty body, before anything is mapped
        for number, buffer in enumerate(buffers):
            buffer[:] = np.random.default_rng(number).integers(0, 256, buffer.size)
            place = arena.locate(buffer)
            assert buffer.__array_interface__["data"][0] % 4096 == 0 and place % 4096 == 0
            assert bytes(process.view(place, buffer.nbytes)) == buffer.tobytes()
        buffers[0][:3] = (7, 8, 9)  # the same memory, not a copy: changes are seen
        assert bytes(process.view(arena.locate(buffers[0]), 3)) == b"\x07\x08\x09"
        # a view inside a buffer is found; memory elsewhere is not
        assert arena.locate(buffers[2][4096:]) == arena.locate(buffers[2]) + 4096
        assert arena.locate(np.zeros(4096, dtype=np.uint8)) == -1
        with pytest.raises(ValueError, match="past the memory file's end"):
            process.view(arena.size, 1)
    finally:
        arena.close()


def test_slabs_grow_from_small_and_get_their_pages_ahead():
    arena = ChunkArena()
    try:
        arena.take(4096)
        assert arena.size == chunkmemory.FIRST_SLAB  # a small trace takes a small file
        for _ in range(40):
            arena.take(1 << 20)
        lengths = sorted(length for length, _ in arena._slabs)
        assert lengths[0] == chunkmemory.FIRST_SLAB and lengths[-1] <= chunkmemory.SLAB
        assert len(lengths) < 10  # doubled, not a slab a buffer
        for filling in arena._filling:
            filling.join()
        assert os.fstat(arena.fd).st_blocks * 512 >= arena.size  # allocated by the threads
    finally:
        arena.close()


def test_a_closed_arena_gives_private_memory_and_finds_nothing():
    arena = ChunkArena()
    kept = arena.take(4096)
    fd = arena.fd
    arena.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    kept[:] = 1  # still mapped: the buffers a gatherer holds stay valid
    assert arena.locate(kept) == -1
    fresh = arena.take(4096)
    assert fresh.nbytes == 4096 and arena.locate(fresh) == -1


def _trace(path, batches=12):
    """Batches of 4 rows of 70 small variables, gathered 4 batches a chunk, by the chunk
    process; returns what each variable was given."""
    recorder = make_recorder(path, gathering=GatherPolicy(min_variables=1, batches=4),
                             chunk_process=True)
    given: dict[str, list[np.ndarray]] = {f"v{n}": [] for n in range(70)}
    for number in range(batches):
        rng = np.random.default_rng(number)
        recorder.begin_pass(4)
        for name, values in given.items():
            data = rng.standard_normal((4, 1024), np.float32)  # 16 KiB a batch
            recorder.put(name, "output", data, ("batch", "hidden"), snapshot=snapshot)
            values.append(data)
        recorder.end_pass()
    recorder.close()
    return {name: np.concatenate(values) for name, values in given.items()}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no memory file"])
def test_gathered_chunks_reach_the_process_without_the_pipe(tmp_path, monkeypatch, shared):
    """Every chunk the process writes lies in the memory file: the pipe carries the
    requests and the new arrays' documents, none of the chunks' bytes; where no memory file
    can be made, the bytes go down the pipe and the store is the same."""
    monkeypatch.setattr(gatherwrite, "PROCESS_FROM", 1)
    if not shared:
        def refused(self):
            raise OSError("no memory files here")
        monkeypatch.setattr(ChunkArena, "__init__", refused)
    sent = {"chunks": 0, "piped": 0}
    send, write_all = chunkproc.ChunkProcess.send, chunkproc.write_all

    def counted_send(self, jobs):
        sent["chunks"] += sum(body.nbytes for _, body, _, _, kind in jobs
                              if kind in (chunkproc.CHUNK, chunkproc.CACHED_CHUNK))
        return send(self, jobs)

    def counted_write(fd, parts):
        sent["piped"] += sum(memoryview(part).nbytes for part in parts)
        return write_all(fd, parts)

    monkeypatch.setattr(chunkproc.ChunkProcess, "send", counted_send)
    monkeypatch.setattr(chunkproc, "write_all", counted_write)
    path = tmp_path / "t.zarr"
    given = _trace(path)
    assert sent["chunks"] >= 70 * 12 * 16384  # every row went to the process
    if shared:
        assert sent["piped"] < sent["chunks"] / 20
    else:
        assert sent["piped"] > sent["chunks"]
    assert layerscope.verify(path).ok
    ds = layerscope.open_trace(path)
    for name, values in given.items():
        np.testing.assert_array_equal(ds[f"{name}@output"].values, values)


def test_a_place_the_process_cannot_read_fails_that_chunk(tmp_path, monkeypatch):
    """A chunk whose place lies outside the memory file is a failure of that chunk (the ones
    before it written), never a file of other bytes."""
    process = chunkproc.ChunkProcess(direct=False, durable=False)
    try:
        process.start()
        assert process.arena is not None
        good, bad = process.arena.take(8192), process.arena.take(8192)
        good[:], bad[:] = 1, 2
        real = chunkproc.ChunkProcess._places
        monkeypatch.setattr(chunkproc.ChunkProcess, "_places", lambda self, jobs: [
            real(self, jobs)[0], self.arena.size + 4096])
        jobs = [(str(tmp_path / name), body, body.nbytes, False, chunkproc.CHUNK)
                for name, body in (("good", good), ("bad", bad))]
        with pytest.raises(chunkproc.ChunkWriteFailed, match="past the memory file's end") \
                as failed:
            process.write(jobs)
        assert len(failed.value.crcs) == 1
        assert (tmp_path / "good").read_bytes() == bytes([1]) * 8192
        assert not (tmp_path / "bad").exists()
    finally:
        process.close()


def test_a_request_is_answered_in_order_up_to_the_first_failure_and_the_next_is_in_step(
        tmp_path):
    """The reply holds each chunk's crc32c in the request's order, up to the first that
    failed, and that failure (the chunks before it on disk, whole, their checksums after
    them); the next request, a new folder's document and then its chunks, is in step."""
    import crc32c

    process = chunkproc.ChunkProcess(direct=True, durable=False)
    try:
        process.start()
        assert process.arena is not None
        bodies = [process.arena.take(160 << 10) for _ in range(40)]
        for number, body in enumerate(bodies):
            body[:] = np.random.default_rng(number).integers(0, 256, body.size)
        paths = [tmp_path / f"c{number}" for number in range(40)]
        paths[23] = tmp_path / "missing" / "c23"  # its folder is not there
        jobs = [(str(path), body, body.nbytes, True, chunkproc.CHUNK)
                for path, body in zip(paths, bodies, strict=True)]
        with pytest.raises(chunkproc.ChunkWriteFailed) as failed:
            process.write(jobs)
        assert failed.value.crcs == [crc32c.crc32c(body) for body in bodies[:23]]
        assert isinstance(failed.value.error, FileNotFoundError)
        assert failed.value.error.filename == str(paths[23])
        for path, body in zip(paths[:23], bodies[:23], strict=True):
            crc = crc32c.crc32c(body).to_bytes(4, "little")
            assert path.read_bytes() == body.tobytes() + crc

        document = np.frombuffer(b'{"zarr_format": 3}', dtype=np.uint8)
        jobs = [(str(tmp_path / "next" / "zarr.json"), document, document.nbytes, False,
                 chunkproc.DOCUMENT_NEW_FOLDER),
                *((str(tmp_path / "next" / f"c{number}"), body, body.nbytes, False,
                   chunkproc.CHUNK) for number, body in enumerate(bodies))]
        assert process.write(jobs) == [0, *(crc32c.crc32c(body) for body in bodies)]
        assert (tmp_path / "next" / "zarr.json").read_bytes() == document.tobytes()
        for number, body in enumerate(bodies):
            assert (tmp_path / "next" / f"c{number}").read_bytes() == body.tobytes()
    finally:
        process.close()
