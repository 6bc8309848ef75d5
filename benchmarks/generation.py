"""Tracing generate(): time and memory against the untraced call (PyTorch, CPU).

A Llama-style model from a config (random weights; 4 layers, width 256, 8 query heads over 2
key/value heads, rotary positions) generates greedily for a batch of 4 left-padded prompts.

Time: ``model.generate(max_new_tokens=64)`` untraced and traced (every block output and
attention map, the store closed: every byte on disk), interleaved trial by trial; prints the
median of each and the traced/untraced ratio.

Memory: each of untraced and traced generation of 32 and of 512 new tokens runs in a process
of its own (``--trials`` of each, the median kept), which reports the peak resident memory
above its baseline during the call, the C heap's free pages given back to the system before
the baseline is read (see :func:`release_free_heap`); prints traced minus untraced at each
length, and the ratio of the two (a capture whose memory is bounded keeps it near 1; one that
holds the generation until it ends grows with the tokens).

    python benchmarks/generation.py [--trials 5] [--new-tokens 64] [--skip-memory]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PeakRSS, fresh

PROMPT_LENGTHS = (12, 9, 16, 5)  # left-padded to 16
CAPTURE = ["model.layers.*", "model.layers.*.self_attn@attention"]


def model_and_inputs() -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    longest = max(PROMPT_LENGTHS)
    ids = torch.randint(3, 1000, (len(PROMPT_LENGTHS), longest))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        mask[row, longest - length:] = 1
    return model, {"input_ids": ids * mask, "attention_mask": mask}


def generate(model: Any, inputs: dict[str, Any], new_tokens: int, path: Path | None) -> None:
    """One greedy generation (never stopping early), traced to ``path`` unless None."""
    import torch

    import layerscope

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        if path is None:
            model.generate(**inputs, **settings)
            return
        with layerscope.trace(model, path, capture=CAPTURE):
            model.generate(**inputs, **settings)


def time_rows(trials: int, new_tokens: int, workdir: Path) -> None:
    model, inputs = model_and_inputs()
    generate(model, inputs, 4, fresh(workdir, "warm.zarr"))  # imports, first allocations
    plain, traced = [], []
    for _ in range(trials):
        start = time.perf_counter()
        generate(model, inputs, new_tokens, None)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(model, inputs, new_tokens, fresh(workdir, "gen.zarr"))
        traced.append(time.perf_counter() - start)
    a, b = statistics.median(plain), statistics.median(traced)
    print(f"generate {new_tokens} new tokens, batch {len(PROMPT_LENGTHS)}, {trials} trials")
    print("| run | median s | ratio |\n|---|---:|---:|")
    print(f"| untraced | {a:.2f} | 1.00 |\n| traced | {b:.2f} | {b / a:.2f} |")


def peak_in_child(new_tokens: int, traced: bool, workdir: Path) -> int:
    """Peak RSS (bytes above the child's baseline) of one generation in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import generation as g; g.child({new_tokens}, {traced}, {str(workdir)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak"])


def release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). The warm-up leaves several MB free but resident inside the heap (its block
    buffers, freed with it), and a run that fills that memory grows without its resident
    memory showing it: the traced run fills it with its own block buffers, the untraced one
    with its key/value cache, which at 32 new tokens is too small to fill it (the difference
    there leaves the block buffers out) and at 512 is not (the difference there counts them).
    Traced minus untraced would grow with the tokens though tracing's memory does not.
    Trimmed, every page a run touches counts."""
    gc.collect()
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def child(new_tokens: int, traced: bool, workdir: str) -> None:
    model, inputs = model_and_inputs()
    generate(model, inputs, 2, Path(workdir) / f"warm-{os.getpid()}.zarr")
    release_free_heap()
    path = Path(workdir) / f"run-{os.getpid()}.zarr" if traced else None
    with PeakRSS() as peak:
        generate(model, inputs, new_tokens, path)
    print(json.dumps({"peak": peak.peak}))


def memory_rows(workdir: Path, trials: int = 5) -> None:
    print(f"\npeak resident memory above the baseline, median of {trials} processes each")
    print("\n| new tokens | untraced peak MB | traced peak MB | traced - untraced MB |")
    print("|---:|---:|---:|---:|")
    extra = {}
    for tokens in (32, 512):
        peaks: dict[bool, list[int]] = {False: [], True: []}
        for _ in range(trials):  # interleaved
            for traced_run in (False, True):
                peaks[traced_run].append(peak_in_child(tokens, traced_run, workdir))
        plain, traced = statistics.median(peaks[False]), statistics.median(peaks[True])
        extra[tokens] = traced - plain
        print(f"| {tokens} | {plain / 2**20:.1f} | {traced / 2**20:.1f} | "
              f"{extra[tokens] / 2**20:.1f} |")
    print(f"\n(traced - untraced) at 512 / at 32: {extra[512] / max(extra[32], 1):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="layerscope-generation-") as tmp:
        workdir = Path(tmp)
        time_rows(args.trials, args.new_tokens, workdir)
        if not args.skip_memory:
            memory_rows(workdir, args.trials)


if __name__ == "__main__":
    main()
