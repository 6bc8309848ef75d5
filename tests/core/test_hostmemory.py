"""Host buffers reused within the byte budget, and chunk files written directly to disk."""

from __future__ import annotations

import mmap
import os
import threading
import time

import numpy as np
import pytest
import zarr

import layerscope
from layerscope.core import Compression, StoreOptions
from layerscope.core._rawfile import ALIGN, DIRECT_FROM
from layerscope.core.chunkfile import ChunkFiles
from layerscope.core.hostpool import HUGE_PAGE, HostPool

from .test_writer import make_recorder


def test_pool_reuses_a_given_back_buffer():
    pool = HostPool(1 << 20)
    first = pool.take(4096)
    address = first.ctypes.data
    assert address % ALIGN == 0
    pool.give(first)
    assert pool.pending == 0
    again = pool.take(4096)
    assert again.ctypes.data == address


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="transparent huge pages: Linux")
def test_pool_buffers_of_a_mb_and_more_start_on_a_huge_page():
    """So that the kernel can back them with 2 MiB pages, which O_DIRECT pins cheaply."""
    pool = HostPool(64 << 20)
    small, large, odd = pool.take(HUGE_PAGE // 4), pool.take(HUGE_PAGE // 2), pool.take(3 << 20)
    assert small.ctypes.data % ALIGN == 0
    assert large.ctypes.data % HUGE_PAGE == 0 and odd.ctypes.data % HUGE_PAGE == 0
    assert (large.nbytes, odd.nbytes) == (HUGE_PAGE // 2, 3 << 20)
    odd[:] = 7  # the memory is there, writable, and reused once given back
    address = odd.ctypes.data
    pool.give(odd)
    assert pool.take(3 << 20).ctypes.data == address


def test_pool_keeps_no_more_than_its_limit():
    pool = HostPool(3 * 4096)
    for size in (4096, 8192):
        pool.give(pool.take(size))
    assert pool.free_bytes == 3 * 4096
    big = pool.take(2 * 4096 + 4096)  # a new size: free buffers are dropped to make room
    assert pool.free_bytes + pool.pooled <= pool.limit
    pool.give(big)
    assert pool.free_bytes <= pool.limit


def test_pool_take_waits_for_room():
    pool = HostPool(8192)
    held = pool.take(8192)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (pool.take(4096), done.set()))
    thread.start()
    assert not done.wait(0.3), "take should block while the budget is full"
    pool.give(held)
    assert done.wait(5)
    thread.join()


@pytest.mark.parametrize("size", [0, 10, ALIGN, 3 * ALIGN + 17, DIRECT_FROM + 3 * ALIGN + 17])
@pytest.mark.parametrize("direct", [True, False])
def test_chunk_file_holds_body_then_trailer(tmp_path, size, direct):
    files = ChunkFiles(tmp_path, direct)
    body = np.frombuffer(os.urandom(size + 1), np.uint8)[1:]  # unaligned on purpose
    files.write("a/c/0", body, b"tail")
    assert (tmp_path / "a/c/0").read_bytes() == body.tobytes() + b"tail"
    files.write("a/c/0", body[: size // 2], b"")  # rewriting truncates
    assert (tmp_path / "a/c/0").read_bytes() == body[: size // 2].tobytes()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_chunk_files_fall_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")  # what tmpfs on older kernels answers
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_direct)
    files = ChunkFiles(tmp_path, direct=True)
    body = np.zeros(DIRECT_FROM, np.uint8) + 7  # smaller files go through the cache anyway
    files.write("c/0", body, b"x")
    assert (tmp_path / "c/0").read_bytes() == body.tobytes() + b"x"
    assert files.direct is False


@pytest.mark.parametrize("compression", [Compression(), Compression(enabled=False),
                                         Compression(enabled=False, checksum=False)])
@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_writes_read_back_exactly_with_checksums(tmp_path, compression, direct_io):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, compression=compression, direct_io=direct_io)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 1000), np.float32) for _ in range(3)]
    for data in batches:
        recorder.begin_pass(4)
        recorder.put("block", "output", data, ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()
    stored = layerscope.open_trace(path)["block@output"].values
    np.testing.assert_array_equal(stored, np.concatenate(batches))
    array = zarr.open_array(path / "block@output", mode="r")
    np.testing.assert_array_equal(array[:], np.concatenate(batches))  # zarr checks each crc32c


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("direct_io", [True, False])
def test_local_traces_write_chunk_bodies_with_o_direct(tmp_path, monkeypatch, direct_io):
    """By default (and only then) chunk files of a local store are opened with O_DIRECT."""
    real_open = os.open
    flags_seen = []
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: flags_seen.append(
        (str(path), flags)) or real_open(path, flags, *a, **k))
    path = tmp_path / "t.zarr"
    options = {} if direct_io else {"direct_io": False}
    assert StoreOptions(**options).direct_io is direct_io
    recorder = make_recorder(path, compression=Compression(enabled=False), **options)
    recorder.begin_pass(2)
    # DIRECT_FROM bytes: smaller chunks go through the page cache
    recorder.put("block", "output", np.ones((2, DIRECT_FROM // 8), np.float32),
                 ("batch", "hidden"))
    recorder.end_pass()
    deadline = time.monotonic() + 30  # written while the trace runs: not by the close
    while recorder.writer.commits.samples < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.writer.commits.samples == 2, "the batch was not committed in 30 s"
    recorder.close()
    chunk_opens = [flags for name, flags in flags_seen if "block@output" in name
                   and os.path.basename(name).startswith("c.")]
    assert chunk_opens, "the chunk file was not written through ChunkFiles"
    assert any(flags & os.O_DIRECT for flags in chunk_opens) is direct_io


def _takes_o_direct(folder) -> bool:
    """Whether the file system of ``folder`` takes a write with O_DIRECT (tmpfs does not)."""
    probe = os.path.join(folder, "o_direct_probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.write(fd, mmap.mmap(-1, ALIGN))  # page-aligned memory, as O_DIRECT needs
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


def _resident_pages(path) -> list[bool]:
    """Whether each page of the file ``path`` is in the page cache (``mincore(2)``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    with open(path, "rb") as file:  # a private mapping untouched: the file's own pages
        mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        start = ctypes.c_char.from_buffer(mapped)
        pages = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        code = libc.mincore(ctypes.addressof(start), size, pages)
        del start  # the mapping closes only once nothing points into it
        if code != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(page & 1) for page in pages.raw]
    finally:
        mapped.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("by_process", [False, True], ids=["threads", "process"])
def test_the_chunks_a_close_waits_for_go_through_the_page_cache(tmp_path, monkeypatch,
                                                                 by_process):
    """While the model runs, chunk files of 64 KiB and more are written with O_DIRECT (the
    page cache's CPU would be taken from the model); the close, which waits for the chunks
    left while no model runs, writes them through the page cache, which takes them sooner
    than the disk. Seen in the page cache: the first group's chunk is not there, the last
    one's, written at the close, is."""
    from layerscope.core import gatherwrite
    from layerscope.core.gather import GatherPolicy

    if not _takes_o_direct(tmp_path):
        pytest.skip("the test folder's file system refuses O_DIRECT: every write is cached")
    monkeypatch.setattr(gatherwrite, "PROCESS_FROM", 1 if by_process else 10**9)
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path, gathering=GatherPolicy(min_variables=1, batches=4),
                             chunk_process=by_process, compression=Compression(enabled=False))
    rng = np.random.default_rng(0)
    given = []
    for _ in range(10):  # chunks of 4 batches of 4 rows of 8 KiB; the third, half used (64
        # KiB, as much as takes O_DIRECT), is written at the close
        data = rng.standard_normal((4, 2048), np.float32)
        recorder.begin_pass(4)
        recorder.put("kept", "output", data, ("batch", "hidden"))
        recorder.end_pass()
        given.append(data)
    recorder.close()
    first = _resident_pages(path / "kept@output" / "c.0.0")
    last = _resident_pages(path / "kept@output" / "c.2.0")
    assert len(first) == len(last) == 33  # 128 KiB, then its crc32c through the page cache
    assert not any(first[:32]), "the first group's chunk went through the page cache"
    assert all(last[:16]), "the chunk written at the close went around the page cache"
    assert not any(last[16:32])  # the rows past the last batch: a hole
    assert layerscope.verify(path).ok
    ds = layerscope.open_trace(path)
    assert ds["kept@output"].values.tobytes() == np.concatenate(given).tobytes()


def test_later_batches_reuse_the_first_batches_buffers(tmp_path, monkeypatch):
    """Memory is set by the first batch: every later snapshot lands in a reused buffer."""
    from layerscope.core import hostpool

    made = []
    real_mmap = hostpool.mmap.mmap
    monkeypatch.setattr(hostpool.mmap, "mmap",
                        lambda *a, **k: made.append(a) or real_mmap(*a, **k))

    def snapshot(value, alloc):
        host = alloc(value.shape, value.dtype)
        host[...] = value
        return host

    # tensors above StoreOptions.gathering.below: small ones wait elsewhere in the first batch
    one_batch = 3 * 4 * 256 * 128 * 4
    recorder = make_recorder(tmp_path / "t.zarr", max_pending_bytes=one_batch)
    rng = np.random.default_rng(0)
    written = []
    for _ in range(12):
        recorder.begin_pass(4)
        for name in ("a", "b", "c"):
            data = rng.standard_normal((4, 256, 128), np.float32)
            written.append(data)
            recorder.writer.put(f"{name}@output", data, ("batch", "token", "hidden"), {},
                                snapshot=snapshot)
        recorder.end_pass()
    recorder.close()
    # at most one batch's worth (fewer where the writer gave a buffer back before the first
    # batch's last snapshot): nothing later asks for more
    assert len(made) <= 3, f"{len(made)} buffers for 12 batches of 3 tensors"
    ds = layerscope.open_trace(tmp_path / "t.zarr")
    np.testing.assert_array_equal(ds["b@output"].values, np.concatenate(written[1::3]))


def test_chunk_files_without_writev(tmp_path, monkeypatch):
    """Platforms without os.writev (Windows) write part by part."""
    monkeypatch.delattr(os, "writev", raising=False)
    files = ChunkFiles(tmp_path, direct=False)
    body = np.arange(10_000, dtype=np.uint8)
    files.write("c.0", body, b"crc!")
    assert (tmp_path / "c.0").read_bytes() == body.tobytes() + b"crc!"


def test_a_cap_below_the_limit_bounds_what_waits_and_what_is_kept():
    pool = HostPool(1 << 20)
    for _ in range(4):  # four free buffers, well within the limit
        pool.give(pool.take(4096))
    kept = [pool.take(4096) for _ in range(4)]
    for buffer in kept:
        pool.give(buffer)
    assert pool.free_bytes == 4 * 4096
    pool.set_cap(2 * 4096)
    assert pool.free_bytes <= 2 * 4096  # dropped beyond the cap at once
    held = [pool.take(4096), pool.take(4096)]
    done = threading.Event()
    thread = threading.Thread(target=lambda: (pool.take(4096), done.set()))
    thread.start()
    assert not done.wait(0.3), "take should block at the cap though the limit has room"
    pool.set_cap(None)  # the limit again: the waiting take goes on
    assert done.wait(5)
    thread.join()
    for buffer in held:
        pool.give(buffer)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("size", [DIRECT_FROM - ALIGN, DIRECT_FROM])
def test_only_chunks_from_a_megabyte_are_written_with_o_direct(tmp_path, monkeypatch, size):
    real_open, flags_seen = os.open, []

    def watch(path, flags, *args, **kwargs):
        flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch)
    body = np.zeros(size, np.uint8) + 7
    ChunkFiles(tmp_path, direct=True).write("c/0", body, b"x")
    assert (tmp_path / "c/0").read_bytes() == body.tobytes() + b"x"
    assert bool(flags_seen[-1] & os.O_DIRECT) == (size >= DIRECT_FROM)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
@pytest.mark.parametrize("nbytes", [16 << 10, 160 << 10, 4 << 20])
def test_fresh_buffers_are_private_memory(nbytes):
    """Shared memory (mmap's default) takes half as long again to touch the first time, and
    gets no huge pages: gathered chunks of a model traced at every module are that memory."""
    from layerscope.core.hostpool import page_aligned

    buffer = page_aligned(nbytes)
    address = buffer.ctypes.data
    assert address % ALIGN == 0 and buffer.nbytes == nbytes
    buffer[...] = 7  # writable, and touched
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            low, high = (int(end, 16) for end in span.split("-"))
            if low <= address < high:
                assert perms == "rw-p", line
                break
        else:
            pytest.fail(f"no mapping holds {address:#x}")
