"""What background work costs a model that keeps every core busy (all-MiniLM-L6-v2, PyTorch).

The plain forward runs while a background thread does one kind of work the writer does, at the
pace of one captured batch per forward (46.5 MB):

  O_DIRECT writes    the bytes straight from a resident buffer to new files on disk
  buffered writes    the same through the page cache
  CPU load           a checksum loop keeping a known share of one core busy

Rows are interleaved trial by trial in one process; each is printed as a ratio to the forward
with nothing in the background. The CPU rows show how much model time each millisecond of
background CPU costs.

    python benchmarks/writer_cost.py [--trials 4]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np
import torch
from _common import encode, fresh, minilm_parser, torch_minilm

from layerscope.core.chunkfile import ChunkFiles
from layerscope.core.hostpool import page_aligned

BATCH_BYTES = 8 * 6 * 12 * 128 * 128 * 4 + 7 * 8 * 128 * 384 * 4  # maps + hidden states
FILE_BYTES = 6 << 20


def main() -> None:
    parser = minilm_parser(__doc__)
    parser.set_defaults(trials=4)
    args = parser.parse_args()
    model, tokenizer = torch_minilm()
    inputs = encode(tokenizer, args.batch_size, args.tokens)
    workdir = Path(tempfile.mkdtemp())  # nothing in it is deleted before the end (see fresh)
    block = page_aligned(FILE_BYTES)  # memory as the writer's pool gives it (huge pages)
    block[:] = np.frombuffer(os.urandom(FILE_BYTES), dtype=np.uint8)

    def forwards() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.batches):
                model(**inputs)
        return (time.perf_counter() - start) / args.batches

    period = forwards()  # the background works at about one batch per forward

    def writes(direct: bool) -> Callable[[threading.Event], None]:
        def run(stop: threading.Event) -> None:
            files = ChunkFiles(fresh(workdir, "writes"), direct)  # as the writer writes chunks
            count = 0
            while not stop.is_set():
                started = time.perf_counter()
                for _ in range(BATCH_BYTES // FILE_BYTES):
                    files.write(f"c.{count}", block, b"")
                    count += 1
                stop.wait(max(0.0, period - (time.perf_counter() - started)))
        return run

    used: dict[str, float] = {}  # CPU seconds a background thread really got, per forward

    def cpu(name: str, share: float) -> Callable[[threading.Event], None]:
        def run(stop: threading.Event) -> None:
            start = time.thread_time()
            while not stop.is_set():
                busy_until = time.perf_counter() + share * 0.02
                while time.perf_counter() < busy_until:
                    crc32c.crc32c(block[: 1 << 18])  # as the writer checksums
                stop.wait((1 - share) * 0.02)
            used[name] = (time.thread_time() - start) / args.batches
        return run

    backgrounds: dict[str, Callable[[threading.Event], None] | None] = {
        "nothing": None, "O_DIRECT writes": writes(True), "buffered writes": writes(False),
        "CPU load, 10% of a core": cpu("CPU load, 10% of a core", 0.10),
        "CPU load, 25% of a core": cpu("CPU load, 25% of a core", 0.25),
    }
    times: dict[str, list[float]] = {name: [] for name in backgrounds}
    costs: dict[str, list[float]] = {name: [] for name in backgrounds}
    def plain_now() -> float:
        return statistics.median(times["nothing"])

    try:
        for _ in range(args.trials):
            for name, work in backgrounds.items():
                stop = threading.Event()
                thread = threading.Thread(target=work, args=(stop,)) if work else None
                if thread:
                    thread.start()
                times[name].append(forwards())
                stop.set()
                if thread:
                    thread.join()
                if name in used:  # model time lost per CPU second the thread used
                    costs[name].append((times[name][-1] - plain_now()) / used[name])
    finally:
        shutil.rmtree(workdir)
    plain = statistics.median(times["nothing"])
    print(f"all-MiniLM-L6-v2, batch {args.batch_size} x {args.tokens}, {args.batches} batches x "
          f"{args.trials} trials, torch threads {torch.get_num_threads()}; background pace: "
          f"{BATCH_BYTES / 2**20:.1f} MB per forward")
    print(f"{'in the background':<26} {'ms/batch':>9} {'vs nothing':>11}")
    for name in backgrounds:
        median = statistics.median(times[name])
        line = f"{name:<26} {median * 1e3:>9.1f} {median / plain:>10.2f}x"
        if costs[name]:
            line += f"   model ms lost per background CPU ms: {statistics.median(costs[name]):.1f}"
        print(line)


if __name__ == "__main__":
    main()
