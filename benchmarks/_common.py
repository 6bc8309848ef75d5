"""What the MiniLM benchmarks share: the input text, the command line, sizes on disk, memory."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psutil

#: repeated and truncated to the benchmark's token count, so every batch is full length
SENTENCE = "layerscope streams what happens inside a network to disk while it runs. "


def minilm_parser(doc: str) -> argparse.ArgumentParser:
    """--batches, --trials, --batch-size, --tokens: the shape of a MiniLM benchmark run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per trial")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    return parser


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class PeakRSS:
    """Samples the resident set size in a thread; reports the peak above the start."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
