"""What the MiniLM benchmarks share: the model, the input text, the command line, sizes on
disk, memory, and switching a part of layerscope off."""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def encode(tokenizer: Any, batch: int, tokens: int, tensors: str = "pt") -> dict[str, Any]:
    """A batch of ``batch`` different texts, each ``tokens`` long, as the tokenizer returns it."""
    return dict(tokenizer(texts(batch), padding="max_length", truncation=True,
                          max_length=tokens, return_tensors=tensors))


def torch_minilm(attn: str = "eager") -> tuple[Any, Any]:
    """The packaged all-MiniLM-L6-v2 in PyTorch (Hugging Face ``BertModel``) and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from layerscope.loading import minilm_folder

    logging.disable_progress_bar()
    folder = minilm_folder()
    model = AutoModel.from_pretrained(str(folder), attn_implementation=attn).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


@contextmanager
def replaced(owner: Any, name: str, stand_in: Callable[..., Any]) -> Iterator[None]:
    """``owner.name`` is ``stand_in`` for the block (a part of layerscope switched off)."""
    original = getattr(owner, name)
    setattr(owner, name, stand_in)
    try:
        yield
    finally:
        setattr(owner, name, original)


def minilm_parser(doc: str) -> argparse.ArgumentParser:
    """--batches, --trials, --batch-size, --tokens: the shape of a MiniLM benchmark run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per trial")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    return parser


_runs = itertools.count()


def fresh(workdir: Path, name: str) -> Path:
    """A path under ``workdir`` that no earlier run used; the script removes ``workdir`` at its end.

    Timed runs never delete what earlier ones wrote. A file system that passes over recently
    freed inodes when it allocates new ones (ext4 without a journal, as on the development
    machine) makes every file created in the minutes after thousands were deleted scan past
    them, at a multiple of the kernel CPU per file of a quiet folder (``file_creation.py``
    measures it; see benchmarks/README.md, File creation). Deleting one row's output would
    charge that to the row after it.
    """
    return workdir / f"{next(_runs)}-{name}"


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
