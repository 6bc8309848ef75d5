"""A PyTorch model traced at every module (its outputs gathered, taken the direct way into the
chunk memory and written a group at a time by the chunk-writing process or by one writer
task; or, gathering off, copied the short way into pool memory and written a task each)
under faults: a disk that fills up (a real tmpfs), SIGKILL at random moments and while the
close writes through the page cache, the chunk process killed, chunk files it wrote damaged,
and two traces at once, each with its chunk process. What docs/guarantees.md promises holds:
the store opens at its last commit with every committed row equal to the model's own output,
`verify` passes, and a kill of the gathering writer loses at most 2G - 1 of the batches that
ended."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import layerscope
from layerscope.core import ChunkError, Compression, StoreOptions, WriterError
from layerscope.core.gather import GatherPolicy

from ..backends.address_copies import count_address_copies
from ..backends.test_torch_direct import Blocks, reference
from .damage import flip_byte

GROUP = 2  # batches per gathered chunk
SLICE = 7  # chunks a request to the chunk process: a group of 50 takes several
WIDTH, TOKENS, SIZE = 64, 16, 8  # 32 KB a variable a batch, 50 variables: 1.6 MB a batch
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import sys
    import torch
    import layerscope
    sys.path.insert(0, sys.argv[2])  # the checkout: its tests package
    from layerscope.core import StoreOptions
    from layerscope.core import gatherwrite
    from tests.backends.address_copies import count_address_copies
    from tests.faults.test_many_sites_faults import SLICE, inputs, model, options

    net = model()
    if sys.argv[3] == "process":  # every group's chunks written by the chunk process
        gatherwrite.PROCESS_FROM, gatherwrite.REQUEST_CHUNKS = 1, SLICE
    copies = count_address_copies(setattr)
    print("ready", flush=True)
    # far more batches than the kill waits for: about 7 ms each on a fast machine
    with torch.no_grad(), layerscope.trace(net, sys.argv[1], options=options(sys.argv[3])):
        for number, x in enumerate(inputs(4000)):
            net(x)
            print("ended", number, len(copies()), flush=True)
""")


def model() -> Blocks:
    torch.manual_seed(0)
    return Blocks(WIDTH).eval()


def inputs(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(SIZE, TOKENS, WIDTH, generator=generator) for _ in range(count)]


def options(mode: str) -> StoreOptions:
    """``process``: gathered, a group's chunks written by the chunk process (where the test
    lowers its threshold to one chunk); ``thread``: by the writer threads; ``plain``: not
    gathered."""
    return StoreOptions(gathering=GatherPolicy(enabled=mode != "plain", batches=GROUP),
                        chunk_process=mode == "process")


def chunk_processes(parent: int) -> list[int]:
    """The chunk-writing processes that ``parent`` started and that still run."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except OSError:
            continue
        script = next((i for i, arg in enumerate(argv) if arg.endswith(b"_chunk_child.py")),
                      None)  # then its request and reply pipes, then the pid that started it
        if script is not None and argv[script + 3:script + 4] == [str(parent).encode()]:
            found.append(int(entry))
    return found


def assert_killed_with_its_chunk_process(child: subprocess.Popen, err: str) -> None:
    """``child`` (ended) died of SIGKILL, and its chunk process, which sees its pipe close,
    ended within 10 s."""
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    deadline = time.monotonic() + 10
    while chunk_processes(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not chunk_processes(child.pid)


def check(path, batches_given: int, gathered: bool = True) -> int:
    """The store opens; its committed rows equal the model's outputs; verify passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = layerscope.open_trace(path)
    committed = int(ds.attrs["committed_batches"])
    assert committed <= batches_given
    if committed:
        assert ds["blocks.0.fc1@output"].attrs.get("gathered_batches") == \
            (GROUP if gathered else None)
        expected = reference(model(), inputs(committed))
        assert len(expected) == 50
        for name, passes in expected.items():
            assert ds[name].values.tobytes() == np.concatenate(passes).tobytes(), name
    assert layerscope.verify(path).ok
    return committed


@pytest.fixture()
def small_tmpfs(tmp_path):
    from ..tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tmpfs", "8m") as folder:
        yield folder


@pytest.mark.parametrize("mode", ["process", "thread", "plain"])
def test_a_full_disk_is_a_writer_error_and_committed_groups_survive(small_tmpfs, mode,
                                                                    process_writes,
                                                                    monkeypatch):
    copies = count_address_copies(monkeypatch.setattr)
    path = small_tmpfs / "t.zarr"
    net, given, error = model(), 0, None
    gathered = mode != "plain"
    try:
        with torch.no_grad(), layerscope.trace(net, path, options=options(mode)):
            for x in inputs(40):
                started = time.monotonic()
                net(x)
                given += 1
    except WriterError as exc:
        error = exc
    assert error is not None, "the tmpfs never filled up"
    assert time.monotonic() - started < 10
    assert "No space left on device" in str(error) and str(path) in str(error)
    # the process writes every group, the first with its arrays' files
    assert bool(process_writes) == (mode == "process")
    # a gathered site's second batch in a chunk is copied by its address: all 50 sites
    assert len(set(copies())) == (50 if gathered else 0), copies()
    committed = check(path, given, gathered)
    if gathered:
        # two groups fit in 8 MB, and a third group's chunks are queued only once the
        # first is committed (the model waits for that at the second group's end): the
        # first always commits. The disk fills in a later group's writes, which may run
        # before the previous group's root document is written: a group whose commit meets
        # the full disk is lost, within the bound a kill has (2G - 1 ended batches)
        assert committed >= max(GROUP, given - (2 * GROUP - 1)), (committed, given)
    else:
        # 1.6 MB a batch, and the arrays' own files: the disk fills within a few batches,
        # after the first commits
        assert committed >= 1


@pytest.mark.parametrize("mode", ["process", "thread", "plain"])
def test_a_kill_at_random_moments_loses_at_most_two_groups(tmp_path, mode):
    gathered = mode != "plain"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(5)
    seen = []
    for trial in range(3):
        path = tmp_path / f"t{trial}.zarr"
        child = subprocess.Popen([sys.executable, "-P", str(script), str(path), ROOT, mode],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(1.0, 3.0))
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=60)
        assert_killed_with_its_chunk_process(child, err)
        # whole lines only: the kill may cut the last one
        ended = [line.split() for line in out.splitlines()
                 if line.startswith("ended ") and len(line.split()) == 3]
        done = int(ended[-1][1]) + 1 if ended else 0
        if done >= GROUP:  # a gathered site's second batch in a chunk: copied by address
            assert (int(ended[-1][2]) >= 50) == gathered, ended[-1]
        committed = check(path, done + 1, gathered)
        if gathered:  # without gathering, what may wait is the writer's budget (64 MB here)
            assert committed >= done - (2 * GROUP - 1), (committed, done)
        seen.append((done, committed))
    # the kills landed mid-stream, after commits
    assert any(done > 3 * GROUP and committed for done, committed in seen), seen


def test_a_killed_chunk_process_is_a_writer_error_and_committed_groups_survive(
        tmp_path, monkeypatch):
    from layerscope.core import gatherwrite

    monkeypatch.setattr(gatherwrite, "PROCESS_FROM", 1)
    monkeypatch.setattr(gatherwrite, "REQUEST_CHUNKS", SLICE)
    path, net, given, error, killed = tmp_path / "t.zarr", model(), 0, None, None
    try:
        with torch.no_grad(), layerscope.trace(net, path, options=options("process")) as run:
            for x in inputs(40):
                net(x)
                given += 1
                process = run.recorder.writer._gathering.process._child
                if killed is None and given >= 3 * GROUP and process is not None:
                    killed = process.pid
                    os.kill(killed, signal.SIGKILL)
    except WriterError as exc:
        error = exc
    assert killed is not None, "the chunk process never started"
    assert error is not None and f"chunk-writing process (pid {killed}) ended" in str(error)
    assert "chunk write" in str(error) and str(path) in str(error)
    assert given < 40
    assert check(path, given) >= max(GROUP, given - (2 * GROUP - 1))
    assert not chunk_processes(os.getpid())


def trace_in_process_mode(net, path, count: int) -> float:
    """Trace ``count`` batches, the groups written by the chunk process; returns the seconds
    the close took."""
    with torch.no_grad(), layerscope.trace(net, path, options=options("process")):
        for x in inputs(count):
            net(x)
        closing = time.monotonic()
    return time.monotonic() - closing


@pytest.fixture()
def process_writes(monkeypatch):
    """Every group written by the chunk process; the pids of the processes that were sent
    chunks (whether or not they could write them)."""
    from layerscope.core import chunkproc, gatherwrite

    monkeypatch.setattr(gatherwrite, "PROCESS_FROM", 1)
    monkeypatch.setattr(gatherwrite, "REQUEST_CHUNKS", SLICE)
    pids: set[int] = set()
    send = chunkproc.ChunkProcess.send

    def counted(self, jobs):
        try:
            return send(self, jobs)
        finally:
            if self._child is not None:
                pids.add(self._child.pid)

    monkeypatch.setattr(chunkproc.ChunkProcess, "send", counted)
    return pids


def test_damaged_chunks_the_process_wrote_are_named(tmp_path, process_writes):
    path = tmp_path / "t.zarr"
    trace_in_process_mode(model(), path, 3 * GROUP)
    assert len(process_writes) == 1, "the chunk process wrote no group"
    assert check(path, 3 * GROUP) == 3 * GROUP
    files = sorted((path / "blocks.3.fc2@output").glob("c.*"))
    assert [f.name for f in files] == ["c.0.0.0", "c.1.0.0", "c.2.0.0"]
    flip_byte(files[1], files[1].stat().st_size // 3, 0x40)
    files[2].write_bytes(files[2].read_bytes()[:-100])  # cut short
    ds = layerscope.open_trace(path)
    with pytest.raises(ChunkError, match=r"blocks\.3\.fc2@output/c\.[12]\.0\.0"):
        ds["blocks.3.fc2@output"].load()
    expected = reference(model(), inputs(3 * GROUP))["blocks.3.fc1@output"]
    assert ds["blocks.3.fc1@output"].values.tobytes() == np.concatenate(expected).tobytes()
    faults = {fault.key for fault in layerscope.verify(path).faults}
    assert faults == {"blocks.3.fc2@output/c.1.0.0", "blocks.3.fc2@output/c.2.0.0"}


def test_two_traces_at_once_each_with_its_chunk_process(tmp_path, process_writes):
    """Two traces in one process, in two threads: each has a chunk process of its own, both
    stores are exact, and each close ends its process at once (a process that misses the
    end of its requests is waited for 10 s, then killed)."""
    batches, errors, closes = 5 * GROUP, [], []

    def run(net, path):
        try:
            closes.append(trace_in_process_mode(net, path, batches))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(model(), tmp_path / f"t{n}.zarr"))
               for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(process_writes) == 2 and len(closes) == 2
    assert max(closes) < 8, closes  # a close waits 10 s for a process that does not end
    for n in (0, 1):
        assert check(tmp_path / f"t{n}.zarr", batches) == batches
    assert not chunk_processes(os.getpid())


def test_compressed_groups_are_written_by_the_writer_threads(tmp_path, process_writes):
    """Compressed chunks are not the chunk process's to write (it writes a chunk's own memory):
    every group goes the writer threads' way, and the store is exact."""
    path, net = tmp_path / "t.zarr", model()
    compressed = StoreOptions(gathering=GatherPolicy(batches=GROUP),
                              compression=Compression(min_saving=0))
    with torch.no_grad(), layerscope.trace(net, path, options=compressed):
        for x in inputs(3 * GROUP):
            net(x)
    assert not process_writes
    codecs = json.loads((path / "blocks.0.fc1@output" / "zarr.json").read_text())["codecs"]
    assert [codec["name"] for codec in codecs] == ["bytes", "blosc", "crc32c"]
    assert check(path, 3 * GROUP) == 3 * GROUP


@pytest.fixture()
def process_jobs(monkeypatch, process_writes):
    """Every group written by the chunk process (the first with its arrays' files); the
    ``(path, kind)`` of each file sent to it."""
    from layerscope.core import chunkproc

    sent: list[tuple[str, str]] = []
    send = chunkproc.ChunkProcess.send

    def spied(self, jobs):
        sent.extend((path, kind) for path, _, _, _, kind in jobs)
        return send(self, jobs)

    monkeypatch.setattr(chunkproc.ChunkProcess, "send", spied)
    return sent


def test_the_chunk_process_writes_the_new_arrays_files(tmp_path, process_jobs):
    """A one-batch trace creates every array at the close: their folders and ``zarr.json``
    are made by the chunk process with their first chunks, each array's own file (rewritten
    at the close with the committed rows) holds what the root's consolidated metadata says
    of it, and the values are exact."""
    from layerscope.core.chunkproc import CACHED_CHUNK, DOCUMENT_NEW_FOLDER

    path = tmp_path / "t.zarr"
    trace_in_process_mode(model(), path, 1)
    documents = {os.path.relpath(p, path) for p, kind in process_jobs
                 if kind == DOCUMENT_NEW_FOLDER}
    root = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    # a compressed array's chunks are not the process's: its file is written by the thread
    raw = {f"{name}/zarr.json" for name in reference(model(), inputs(1))
           if "blosc" not in json.dumps(root[name]["codecs"])}
    assert len(raw) > 40 and raw <= documents, raw - documents
    # written at the close, which no model waits for: through the page cache
    assert sum(kind == CACHED_CHUNK for _, kind in process_jobs) >= len(raw)
    for key in documents:
        name = os.path.dirname(key)
        own = json.loads((path / key).read_text())
        assert own == root[name] and own["attributes"]["gathered_batches"] == GROUP, name
        assert not [f for f in (path / name).iterdir() if f.name.startswith(".")], name
    assert check(path, 1) == 1


@pytest.mark.parametrize("in_place", ["file", "link"])
def test_a_new_arrays_folder_the_process_cannot_make_fails_the_trace(tmp_path, process_jobs,
                                                                   in_place):
    """A file, or a link to a folder outside the store, where the chunk process is to make a
    new array's folder: the trace fails naming it, nothing is written through the link, the
    array is not published, and the store opens at its last commit (none here)."""
    path, outside = tmp_path / "t.zarr", tmp_path / "outside"
    outside.mkdir()
    net, error = model(), None
    blocked = path / "blocks.3.fc2@output"
    try:
        with torch.no_grad(), layerscope.trace(net, path, options=options("process")) as run:
            if in_place == "file":
                blocked.write_bytes(b"not a folder")
            else:
                os.symlink(outside, blocked)
            for x in inputs(2 * GROUP):
                net(x)
    except WriterError as exc:
        error = exc
    assert error is not None and "blocks.3.fc2@output" in str(error)
    assert ("symbolic link" if in_place == "link" else "Not a directory") in str(error)
    assert list(outside.iterdir()) == []
    if in_place == "file":
        assert blocked.read_bytes() == b"not a folder"
    assert any(os.path.dirname(p) == str(blocked) for p, _ in process_jobs)
    assert run.recorder.writer.variables["blocks.3.fc2@output"].document is None
    assert check(path, 2 * GROUP) == 0


KILL_IN_CREATION = textwrap.dedent("""
    import os
    import signal
    import sys
    import torch
    import layerscope
    sys.path.insert(0, sys.argv[2])  # the checkout: its tests package
    from layerscope.core import chunkproc, gatherwrite
    from tests.faults.test_many_sites_faults import SLICE, inputs, model, options

    gatherwrite.PROCESS_FROM = 1
    gatherwrite.REQUEST_CHUNKS = gatherwrite.CREATE_REQUEST_CHUNKS = SLICE
    calls = []
    send, receive = chunkproc.ChunkProcess.send, chunkproc.ChunkProcess.receive

    def sent(self, jobs):  # the fourth request of new arrays is in the pipe: killed there
        send(self, jobs)
        calls.append(jobs)
        if sys.argv[3] == "sent" and len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    def received(self):  # a third request's files are written, its arrays not published
        crcs = receive(self)
        if sys.argv[3] == "received" and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return crcs

    chunkproc.ChunkProcess.send, chunkproc.ChunkProcess.receive = sent, received
    net = model()
    with torch.no_grad(), layerscope.trace(net, sys.argv[1], options=options("process")):
        for x in inputs(2 * 2):
            net(x)
""")


@pytest.mark.parametrize("moment", ["sent", "received"])
def test_a_kill_while_the_chunk_process_makes_the_arrays_leaves_a_store_to_append_to(
        tmp_path, moment, process_jobs):
    """SIGKILL while the chunk process writes the first group's new arrays (their folders,
    ``zarr.json`` and chunks): with a request in the pipe, or once one was written and before
    its arrays were published. The store opens at its last commit (none), ``verify`` passes,
    and an append takes up the arrays left behind and makes the others, every value exact."""
    from layerscope.core.chunkproc import CHUNK

    script = tmp_path / "child.py"
    script.write_text(KILL_IN_CREATION)
    path = tmp_path / "t.zarr"
    child = subprocess.run([sys.executable, "-P", str(script), str(path), ROOT, moment],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    made = [folder for folder in path.iterdir() if (folder / "zarr.json").exists()
            and folder.name.startswith("blocks.")]
    assert made, "no array's file was written before the kill"
    assert check(path, 0) == 0
    net = model()
    with torch.no_grad(), layerscope.trace(net, path, mode="a", options=options("process")):
        for x in inputs(2 * GROUP):
            net(x)
    # the arrays left behind are the append's (their own zarr.json: see reopen.py), their
    # first chunks written by the process too
    first = {os.path.dirname(p) for p, kind in process_jobs
             if kind == CHUNK and os.path.basename(p).startswith("c.0.")}
    assert first & {str(folder) for folder in made}, "the arrays left behind: not by the process"
    assert check(path, 2 * GROUP) == 2 * GROUP


KILL_IN_CLOSE = textwrap.dedent("""
    import os
    import signal
    import sys
    import torch
    import layerscope
    sys.path.insert(0, sys.argv[2])  # the checkout: its tests package
    from layerscope.core import chunkfile, chunkproc, gatherwrite
    from tests.faults.test_many_sites_faults import SLICE, inputs, model, options

    mode, cached = sys.argv[3], []
    if mode == "process":  # killed with the close's second request in the pipe
        gatherwrite.PROCESS_FROM, gatherwrite.REQUEST_CHUNKS = 1, SLICE
        send = chunkproc.ChunkProcess.send

        def sent(self, jobs):
            send(self, jobs)
            if any(job[4] == chunkproc.CACHED_CHUNK for job in jobs):
                cached.append(jobs)
                if len(cached) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

        chunkproc.ChunkProcess.send = sent
    else:  # killed once the close's writer threads wrote ten chunk files
        write = chunkfile.ChunkFiles.write

        def written(self, *args, **kwargs):
            write(self, *args, **kwargs)
            if self.cached:
                cached.append(args[0])
                if len(cached) == 10:
                    os.kill(os.getpid(), signal.SIGKILL)

        chunkfile.ChunkFiles.write = written
    net = model()
    with torch.no_grad(), layerscope.trace(net, sys.argv[1], options=options(mode)):
        for x in inputs(int(sys.argv[4])):
            net(x)
""")


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_kill_while_the_close_writes_through_the_page_cache_leaves_a_store_to_append_to(
        tmp_path, mode):
    """SIGKILL while the close writes the last group's chunks through the page cache (by the
    chunk process, a request in its pipe; or by the writer threads, some files written):
    the store opens at its last commit, which holds every batch but the last group's at
    most two groups back, every committed row exact; ``verify`` passes; an append continues
    it, every value exact."""
    script = tmp_path / "child.py"
    script.write_text(KILL_IN_CLOSE)
    path = tmp_path / "t.zarr"
    given = 4 * GROUP + 1  # the last group, of one batch, is written at the close
    child = subprocess.Popen([sys.executable, "-P", str(script), str(path), ROOT, mode,
                              str(given)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    _, err = child.communicate(timeout=120)
    assert_killed_with_its_chunk_process(child, err)
    committed = check(path, given)
    assert given - (2 * GROUP - 1) <= committed < given, committed
    more, net = committed + 2 * GROUP, model()
    with torch.no_grad(), layerscope.trace(net, path, mode="a", options=options(mode)):
        for x in inputs(more)[committed:]:
            net(x)
    assert check(path, more) == more
