"""Only the data asked for: a data set of short texts traced at the last token of every block.

A small Llama-style model (random weights, from a config; PyTorch, CPU) reads a data set of
random token ids of random lengths (``--texts``, 10,000 by default), batched and left-padded to
each batch's longest text, as a causal LM reads a data set for its last-token states. Two ways
of running the same batches, side by side in one process, interleaved trial by trial (the
order reversed every other trial), after one untimed run of each (warm-up):

  plain       model(input_ids, attention_mask)
  last token  the same inside ``layerscope.trace(model, path, blocks, positions="last")``: the
              last real token of every block's output is taken inside the hook, and only
              (batch, hidden) per block is copied and written (time includes opening and
              closing the store: every byte on disk)

The forward runs on one thread by default (``--threads``; both rows alike): on a shared
machine, PyTorch's OpenMP threads wait at every operation for the one another process has
descheduled, and a plain forward on two threads of two busy cores ran 3-20x slower than on
an idle machine, from one second to the next. With one thread the other core is free for the
writer's threads, as it is for whatever else a busy machine runs.

``--whole`` adds a third row that stores every block's whole output, for comparison. Prints the
median over the trials (five by default) of the time per run, its ratio to the plain forward,
the bytes stored per run, and each trial's time and ratio to that trial's plain run.

    python benchmarks/reductions.py [--texts 10000] [--trials 5] [--batch-size 64] [--threads 1]
                                    [--whole]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import folder_bytes, fresh
from transformers import LlamaConfig, LlamaForCausalLM

import layerscope
from layerscope.core import StoreOptions

VOCAB = 4000
LAYERS = 6


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def data_set(texts: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``texts`` random texts of 8 to 32 tokens, in batches left-padded to their longest."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (texts,), generator=generator)
    batches = []
    for start in range(0, texts, batch_size):
        own = lengths[start:start + batch_size]
        longest = int(own.max())
        ids = torch.randint(1, VOCAB, (len(own), longest), generator=generator)
        mask = (torch.arange(longest)[None, :] >= (longest - own)[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


BLOCKS = [f"model.layers.{i}@output" for i in range(LAYERS)]


def run_plain(model, batches, workdir: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - start, 0


def run_traced(model, batches, workdir: Path, positions: str | None = "last"
               ) -> tuple[float, int]:
    path = fresh(workdir, "trace.zarr")
    start = time.perf_counter()
    with layerscope.trace(model, path, BLOCKS, positions=positions,
                          options=StoreOptions(mode="w")), torch.no_grad():
        for batch in batches:
            model(**batch)
    elapsed = time.perf_counter() - start
    return elapsed, folder_bytes(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10_000, help="texts in the data set")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads")
    parser.add_argument("--whole", action="store_true",
                        help="add a row storing every block's whole output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    batches = data_set(args.texts, args.batch_size)
    methods: dict[str, Callable[..., tuple[float, int]]] = {
        "plain forward": run_plain, "last token of every block": run_traced}
    if args.whole:
        methods["every block's whole output"] = lambda m, b, w: run_traced(m, b, w, None)
    times: dict[str, list[float]] = {name: [] for name in methods}
    stored: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for method in methods.values():  # warm up every path and every batch shape
            method(model, batches, workdir)
        for trial in range(args.trials):
            order = list(methods.items())
            for name, method in order if trial % 2 == 0 else order[::-1]:
                elapsed, size = method(model, batches, workdir)
                os.sync()  # untimed: no row pays for an earlier row's page cache
                times[name].append(elapsed)
                stored[name] = size
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"Llama-style, {LAYERS} layers, hidden 128, random weights; {args.texts} texts "
          f"({tokens} tokens, 8-32 each), {len(batches)} batches of {args.batch_size}, "
          f"left-padded; {args.trials} trials; torch threads {torch.get_num_threads()}")
    plain = statistics.median(times["plain forward"])
    print(f"{'method':<28} {'s/run':>7} {'vs plain':>9} {'stored':>10}  "
          "(each trial: s, and vs that trial's plain run)")
    for name in methods:
        median = statistics.median(times[name])
        runs = " ".join(f"{t:.1f} {t / p:.2f}x" for t, p in zip(
            times[name], times["plain forward"], strict=True))
        print(f"{name:<28} {median:>7.2f} {median / plain:>8.2f}x "
              f"{stored.get(name, 0) / 2**20:>7.1f} MB  ({runs})")


if __name__ == "__main__":
    main()
