"""What the MiniLM benchmarks share: the input text, the command line, sizes on disk, memory."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psutil

#: one sample per line, each repeated and truncated to the benchmark's token count (so every
#: batch is full length); the samples differ, as real batches do, so that no compression setting
#: is flattered by identical rows
SENTENCES = (
    "layerscope streams what happens inside a network to disk while it runs.",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Attention maps show which tokens each head looks at when it builds a representation.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "She planted tomatoes, basil and peppers in the small garden behind the old house.",
    "Compilers translate source code into machine instructions through several passes.",
    "The orchestra rehearsed the second movement twice before the evening concert began.",
    "Glaciers in the northern valleys have retreated by several kilometres in a century.",
)


def texts(batch: int, repeat: int = 20) -> list[str]:
    """``batch`` different texts, each long enough to fill the benchmark's tokens."""
    return [" ".join([SENTENCES[i % len(SENTENCES)]] * repeat) for i in range(batch)]


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
