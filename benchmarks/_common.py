"""What the MiniLM benchmarks share: the model, the input text, the command line, sizes on
disk, memory, and switching a part of layerscope off."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# -- forked children (benchmarks/faults.py) ---------------------------------------------------------

#: how a forked child reports to its parent: one JSON object per call
Send = Callable[[dict[str, Any]], None]

@dataclass
class Outcome:
    code: int  # exit status; -9 when SIGKILLed
    killed: bool  # by the parent's timer
    hung: bool  # killed by the watchdog
    messages: list[dict[str, Any]]
    seconds: float
    opened: float | None = None  # seconds until the writer said "open"


def run_child(body: Callable[[Send], None], timeout: float, kill_after: float | None = None,
              on_message: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """Run ``body`` in a forked child; it reports through ``send``. SIGKILL it after
    ``kill_after`` seconds; ``timeout`` seconds without a message is a hang (killed)."""
    from layerscope import LayerscopeError

    if threading.active_count() != 1:
        raise RuntimeError("the campaign forks only from a process without threads")
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            os.close(read)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            warnings.simplefilter("ignore")

            def send(message: dict[str, Any]) -> None:
                os.write(write, (json.dumps(message) + "\n").encode())

            try:
                body(send)
                code = 0
            except LayerscopeError as exc:
                send({"k": "typed", "error": f"{type(exc).__name__}: {exc}"[:1500]})
                code = 3
            except BaseException as exc:
                text = "".join(traceback.format_exception(exc))
                send({"k": "untyped", "error": text[-1500:]})
                code = 4
        finally:
            os._exit(code)
    os.close(write)
    pidfd = os.pidfd_open(pid)
    start = last = time.monotonic()
    killed = hung = False
    opened = None
    messages: list[dict[str, Any]] = []
    buffer = b""
    watching = [pidfd, read]
    while pidfd in watching:
        now = time.monotonic()
        until = last + timeout
        if kill_after is not None and not killed:
            until = min(until, start + kill_after)
        ready, _, _ = select.select(watching, [], [], max(0.0, until - now))
        if read in ready:
            data = os.read(read, 1 << 16)
            if not data:
                watching.remove(read)
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                messages.append(message)
                last = time.monotonic()
                if message.get("k") == "open":
                    opened = last - start
                if on_message is not None:
                    on_message(message)
        if pidfd in ready:
            watching.remove(pidfd)
            continue
        now = time.monotonic()
        if kill_after is not None and not killed and now >= start + kill_after:
            os.kill(pid, signal.SIGKILL)
            killed = True
        elif now >= last + timeout and not hung:
            os.kill(pid, signal.SIGKILL)
            hung = True
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - start
    while read in watching:  # what the child wrote just before it ended
        data = os.read(read, 1 << 16)
        if not data:
            break
        buffer += data
    for line in buffer.split(b"\n"):
        if line.strip():
            try:
                messages.append(json.loads(line))
            except ValueError:
                pass  # a line cut by the kill
    os.close(read)
    os.close(pidfd)
    code = os.waitstatus_to_exitcode(status)
    return Outcome(code, killed and code == -signal.SIGKILL, hung, messages, seconds, opened)
