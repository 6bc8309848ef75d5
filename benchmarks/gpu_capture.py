"""Capture overhead on one GPU: a 1B-class Llama-style model in bfloat16, random weights.

The config: hidden 2048, 16 layers, 32 query heads, 8 key/value heads, intermediate 5632,
vocabulary 32000 (852.6M parameters). Rows, measured side by side in one process and
interleaved trial by trial so that noise hits all of them alike:

  plain forward                 model(input_ids)
  block outputs -> zarr         every decoder layer's output (model.layers.N@output) streamed
                                to a Zarr store; the time includes closing it (every byte on disk)
  block outputs, copied only    the same tensors copied off the device and waited for by the
                                writer threads, nothing written: the capture path's own cost
  block outputs, last token     positions="last": each block output's last token, picked on
                                the device; only that comes off it
  attention maps -> zarr        every layer's attention probabilities (under SDPA recomputed
                                from query and key, in float32), fewer batches (they are large)
  attention maps, copied only

Each row prints its median time per batch, its ratio to the plain forward, the bytes it takes
off the device per batch, and that as GB/s next to two measured references: the
device-to-host bandwidth (a plain copy of a 1 GiB device buffer into pinned memory) and the
sequential write bandwidth of the store's disk. Two more columns split a row's time: "in
batches", its time per batch from the trace's open to the last batch done on the device, as
a ratio to the plain forward; "open+close", what opening and closing the store add to a
trace (the close waits for the writer to finish); "thread CPU", the model thread's CPU time
a batch (a thread waiting in ``torch.cuda.synchronize`` spins, so this counts waits for the
device too). Whether the plain forward is bound by the host or the device is measured apart:
one batch at a time, the time until ``model(...)`` returns (the host has queued every kernel)
against the time until the device has run them. Where the two are close the host bounds the
batch (on an H200, batch 2 x 1024) and every microsecond a hook spends on the model's thread
adds to it; where the host finishes well before the device (``--batch 8``) the hooks' host
time hides behind the device's work. ``--profile
DIR`` then traces each capture row once more under cProfile (the model's thread) and writes
its 40 costliest functions to DIR. Target: block outputs -> zarr within 1.10x
of the plain forward. Stores are deleted after each run, untimed (the disk is small).

    python benchmarks/gpu_capture.py [--batch 2] [--tokens 1024] [--batches 10]
        [--attention-batches 3] [--trials 5] [--attn sdpa|eager] [--workers 2] [--store DIR]
        [--no-attention] [--profile DIR]
    python benchmarks/gpu_capture.py --cpu-smoke   # a tiny config on CPU: runs the script's
                                                   # code, measures nothing about GPUs
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import folder_bytes, fresh, replaced

import layerscope
from layerscope.core import Recorder, StoreOptions
from layerscope.core.writer import TraceWriter

BILLION = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
TARGET = 1.10


@dataclass
class Timing:
    total: float  # seconds, the trace's open and close included
    batches: float  # seconds from the trace's open to the last batch done on the device
    cpu: float  # CPU seconds of the model's thread in those batches
    stored: int = 0  # bytes on disk


@dataclass
class Row:
    run: Callable[[int], Timing]  # batches -> its timing
    batches: int
    moved: int  # bytes a batch takes off the device


@dataclass
class Setup:
    model: torch.nn.Module
    ids: torch.Tensor
    device: torch.device
    store: Path
    workers: int

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = TINY if args.cpu_smoke else BILLION
    config = LlamaConfig(**sizes, max_position_embeddings=max(args.tokens, 128),
                         attn_implementation=args.attn)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 4 GB detour through the host
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def run_plain(setup: Setup, batches: int) -> Timing:
    setup.sync()
    start, cpu = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        for _ in range(batches):
            setup.model(input_ids=setup.ids, use_cache=False)
    setup.sync()
    elapsed = time.perf_counter() - start
    return Timing(elapsed, elapsed, time.thread_time() - cpu)


def host_share(setup: Setup, batches: int = 5) -> float:
    """The plain forward's host time (until ``model(...)`` returns, every kernel queued) as a
    share of its time until the device has run them: median of one-batch runs."""
    shares = []
    with torch.no_grad():
        for _ in range(batches):
            setup.sync()
            start = time.perf_counter()
            setup.model(input_ids=setup.ids, use_cache=False)
            queued = time.perf_counter() - start
            setup.sync()
            shares.append(queued / (time.perf_counter() - start))
    return statistics.median(shares)


def run_capture(setup: Setup, batches: int, capture: list[str], kinds: list[str],
                copied_only: bool = False, **select: Any) -> Timing:
    path = fresh(setup.store, "trace.zarr")
    options = StoreOptions(mode="w", workers=setup.workers)
    setup.sync()
    start = time.perf_counter()
    if copied_only:  # the writer waits for each copy and converts it, then drops it
        with replaced(TraceWriter, "_write", lambda self, task: task.to_numpy(task.data)):
            ran, cpu = _trace(setup, path, batches, capture, kinds, options, **select)
    else:
        ran, cpu = _trace(setup, path, batches, capture, kinds, options, **select)
    elapsed = time.perf_counter() - start  # the trace's close waited for every byte
    stored = folder_bytes(path)
    shutil.rmtree(path)
    return Timing(elapsed, ran, cpu, stored)


def _trace(setup: Setup, path: Path, batches: int, capture: list[str], kinds: list[str],
           options: StoreOptions, **select: Any) -> tuple[float, float]:
    """Seconds from the trace's open to the last batch done on the device (its copies too),
    and the model thread's CPU seconds in them."""
    with layerscope.trace(setup.model, path, capture, kinds=kinds, options=options,
                          **select), torch.no_grad():
        opened, cpu = time.perf_counter(), time.thread_time()
        for _ in range(batches):
            setup.model(input_ids=setup.ids, use_cache=False)
        setup.sync()
        return time.perf_counter() - opened, time.thread_time() - cpu


def device_to_host_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a plain copy from ``device`` into pinned memory (median of 5)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def disk_write_bandwidth(folder: Path, nbytes: int) -> float:
    """Bytes per second of one sequential write of ``nbytes``, flushed to the disk."""
    piece = os.urandom(16 << 20)
    path = folder / "sequential.bin"
    start = time.perf_counter()
    with open(path, "wb") as file:
        for _ in range(max(1, nbytes // len(piece))):
            file.write(piece)
        file.flush()
        os.fsync(file.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return max(1, nbytes // len(piece)) * len(piece) / elapsed


def captured_bytes(model: torch.nn.Module, ids: torch.Tensor, capture: list[str],
                   kinds: list[str], store: Path, **select: Any) -> int:
    """Bytes a batch takes off the device: the captured tensors (after any token selection)
    as the store holds them (bfloat16 widened to float32 on the device, before the copy)."""
    total = 0
    original = Recorder.put

    def counted(self: Recorder, site: str, kind: str, tensor: torch.Tensor, *rest: Any,
                **more: Any) -> None:
        nonlocal total
        size = 4 if tensor.dtype == torch.bfloat16 else tensor.element_size()
        total += tensor.numel() * size
        original(self, site, kind, tensor, *rest, **more)

    with replaced(Recorder, "put", counted):
        path = fresh(store, "count.zarr")
        with layerscope.trace(model, path, capture, kinds=kinds,
                              options=StoreOptions(mode="w"), **select), torch.no_grad():
            model(input_ids=ids, use_cache=False)
        shutil.rmtree(path)
    return total


def profile_rows(rows: dict[str, Row], folder: Path) -> None:
    """Each capture row once more under cProfile (the model's thread, where the hooks run):
    its 40 costliest functions by their own time, one text file a row."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, row in rows.items():
        if name == "plain forward":
            continue
        profile = cProfile.Profile()
        profile.enable()
        row.run(row.batches)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        (folder / f"{slug}.txt").write_text(f"{name}, {row.batches} batches\n{text.getvalue()}")


def human_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=10, help="batches per trial")
    parser.add_argument("--attention-batches", type=int, default=3,
                        help="batches per trial of the attention rows")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--workers", type=int, default=StoreOptions().workers,
                        help="writer threads")
    parser.add_argument("--store", type=Path, default=None,
                        help="folder for the stores (default: a temporary folder)")
    parser.add_argument("--no-attention", action="store_true",
                        help="leave out the attention rows (their maps grow as batch x "
                             "tokens squared)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after the trials, profile each capture row once into this folder")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny config on CPU: exercises this script, measures no GPU")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.batch, args.tokens = 2, 32
        args.batches, args.attention_batches = min(args.batches, 3), min(args.attention_batches, 2)
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit(f"gpu_capture.py needs a CUDA device and this machine has none "
                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                 "Run it on a GPU machine; --cpu-smoke runs a tiny config on CPU instead.")
    else:
        device = torch.device("cuda", torch.cuda.current_device())

    with tempfile.TemporaryDirectory(dir=args.store) as tmp:
        store = Path(tmp)
        model = build(args, device)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens),
                            generator=torch.Generator().manual_seed(1)).to(device)
        setup = Setup(model, ids, device, store, args.workers)
        layers = model.config.num_hidden_layers
        blocks = [f"model.layers.{index}@output" for index in range(layers)]
        maps = ["model.layers.*.self_attn@attention"]
        block_bytes = captured_bytes(model, ids, blocks, ["output"], store)
        map_bytes = 0 if args.no_attention else \
            captured_bytes(model, ids, maps, ["attention"], store)
        last_bytes = captured_bytes(model, ids, blocks, ["output"], store, positions="last")
        rows = {
            "plain forward": Row(lambda n: run_plain(setup, n), args.batches, 0),
            "block outputs -> zarr": Row(
                lambda n: run_capture(setup, n, blocks, ["output"]), args.batches, block_bytes),
            "block outputs, copied only": Row(
                lambda n: run_capture(setup, n, blocks, ["output"], True), args.batches,
                block_bytes),
            "block outputs, last token": Row(
                lambda n: run_capture(setup, n, blocks, ["output"], positions="last"),
                args.batches, last_bytes),
            "attention maps -> zarr": Row(
                lambda n: run_capture(setup, n, maps, ["attention"]), args.attention_batches,
                map_bytes),
            "attention maps, copied only": Row(
                lambda n: run_capture(setup, n, maps, ["attention"], True),
                args.attention_batches, map_bytes),
        }
        if args.no_attention:
            del rows["attention maps -> zarr"], rows["attention maps, copied only"]
        copy_rate = device_to_host_bandwidth(device, (64 if args.cpu_smoke else 1024) << 20)
        disk_rate = disk_write_bandwidth(store, (64 if args.cpu_smoke else 1024) << 20)

        for row in rows.values():  # warm up every path once
            row.run(1)
        times: dict[str, list[float]] = {name: [] for name in rows}
        in_trace: dict[str, list[float]] = {name: [] for name in rows}
        fixed: dict[str, list[float]] = {name: [] for name in rows}  # open + close - batches
        cpu: dict[str, list[float]] = {name: [] for name in rows}  # the model thread's
        stored: dict[str, int] = {}
        peaks: dict[str, int] = dict.fromkeys(rows, 0)
        for _ in range(args.trials):
            for name, row in rows.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timing = row.run(row.batches)
                times[name].append(timing.total / row.batches)
                in_trace[name].append(timing.batches / row.batches)
                fixed[name].append(timing.total - timing.batches)
                cpu[name].append(timing.cpu / row.batches)
                stored[name] = timing.stored // row.batches
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
        queued = host_share(setup)
        if args.profile is not None:
            profile_rows(rows, args.profile)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        "CPU (--cpu-smoke: a tiny config; no figure here says anything about GPUs)"
    print(f"{where}; torch {torch.__version__}; Llama-style "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, bfloat16, "
          f"{args.attn} attention; batch {args.batch} x {args.tokens} tokens; "
          f"{args.batches} batches ({args.attention_batches} for attention) x {args.trials} "
          f"trials; {args.workers} writer threads")
    reference = "device -> pinned host copy" if device.type == "cuda" else "host memory copy"
    print(f"{reference}: {copy_rate / 1e9:.1f} GB/s; sequential write to the store's disk: "
          f"{disk_rate / 1e9:.2f} GB/s")
    plain = statistics.median(times["plain forward"])
    print(f"{'row':<28} {'ms/batch':>9} {'vs plain':>9} {'off device':>11} {'GB/s':>7} "
          f"{'of copy':>8} {'stored':>9} {'device peak':>12} {'in batches':>11} "
          f"{'open+close':>11} {'thread CPU':>11}")
    for name, row in rows.items():
        median = statistics.median(times[name])
        rate = row.moved / median
        moved = f"{human_bytes(row.moved):>11} {rate / 1e9:>7.2f} {rate / copy_rate:>7.0%}" \
            if row.moved else f"{'':>11} {'':>7} {'':>7}"
        peak = human_bytes(peaks[name]) if device.type == "cuda" else "-"
        batches = statistics.median(in_trace[name])
        print(f"{name:<28} {median * 1e3:>9.1f} {median / plain:>8.2f}x {moved} "
              f"{human_bytes(stored.get(name, 0)):>9} {peak:>12} {batches / plain:>10.2f}x "
              f"{statistics.median(fixed[name]) * 1e3:>8.0f} ms "
              f"{statistics.median(cpu[name]) * 1e3:>8.1f} ms")
    bound = "the host (launching kernels): each hook's host time adds to the batch" \
        if queued > 0.9 else "the device: the hooks' host time may hide behind its work"
    print(f"plain forward: the host queues its kernels in {queued:.0%} of the time the device "
          f"takes to run them; bound by {bound}")
    blocks_ratio = statistics.median(times["block outputs -> zarr"]) / plain
    verdict = "met" if blocks_ratio <= TARGET else "NOT met"
    print(f"target: block outputs -> zarr within {TARGET:.2f}x of the plain forward: "
          f"{blocks_ratio:.2f}x, {verdict}" + (" (CPU smoke run: not a measurement of the "
                                                 "target)" if args.cpu_smoke else ""))


if __name__ == "__main__":
    main()
