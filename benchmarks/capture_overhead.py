"""Capture overhead on all-MiniLM-L6-v2 (PyTorch, CPU): batch 8 x 128 tokens.

Three ways of running the same batches, measured side by side in one process and interleaved
trial by trial so that machine noise hits all of them alike:

  plain      model(**inputs)
  layerscope every attention map + every hidden state streamed to a Zarr store on disk
             (time per batch includes closing the store, i.e. every byte is on disk), with
             the default compression (which leaves dense activations uncompressed), then
             with every variable compressed (LZ4-5, byte shuffle) for comparison
  savez      output_attentions + output_hidden_states, then numpy.savez of the same tensors

Prints the median time per batch, its ratio to the plain forward, stored bytes and the peak
resident memory above the process's baseline while each ran. ``--parts`` adds two rows that
switch the capture off part by part, to show where its time goes:

  hooks only      the hooks run, but the recorder drops every tensor
  copied only     every tensor is copied into the writer's buffers, but nothing is written

Every run writes to a new path and nothing is deleted until the script ends (see
``_common.fresh``): about 14 GB of disk with the defaults. After each row, untimed, ``os.sync``
writes back what the row left in the page cache (savez writes through it), so that no row
pays for an earlier row's writes.

    python benchmarks/capture_overhead.py [--batches 20] [--trials 5] [--attn eager|sdpa] [--parts]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import PeakRSS, encode, folder_bytes, fresh, minilm_parser, replaced, torch_minilm

import layerscope
from layerscope.core import Compression, Recorder, StoreOptions
from layerscope.core.writer import TraceWriter

# the block outputs (= output_hidden_states) and the attention maps (= output_attentions)
CAPTURE = ["embeddings@output", "encoder.layer.[0-9]@output",
           "encoder.layer.*.attention.self@attention"]


def run_plain(model, inputs, batches: int, workdir: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(batches):
            model(**inputs)
    return time.perf_counter() - start, 0


def run_layerscope(model, inputs, batches: int, workdir: Path,
                   compression: Compression | None = None, durable: bool = False
                   ) -> tuple[float, int]:
    path = fresh(workdir, "trace.zarr")
    options = StoreOptions(mode="w", compression=compression or Compression(), durable=durable)
    start = time.perf_counter()
    with layerscope.trace(model, path, CAPTURE, options=options), torch.no_grad():
        for _ in range(batches):
            model(**inputs)
    elapsed = time.perf_counter() - start
    return elapsed, folder_bytes(path)


def run_part(model, inputs, batches: int, workdir: Path, owner: type, name: str
             ) -> tuple[float, int]:
    """A layerscope run with ``owner.name`` doing nothing."""
    with replaced(owner, name, lambda *args, **kwargs: None):
        return run_layerscope(model, inputs, batches, workdir)


def run_savez(model, inputs, batches: int, workdir: Path) -> tuple[float, int]:
    targets = [fresh(workdir, f"batch_{index}.npz") for index in range(batches)]
    start = time.perf_counter()
    with torch.no_grad():
        for target in targets:
            out = model(**inputs, output_attentions=True, output_hidden_states=True)
            arrays = {f"attention_{i}": a.numpy() for i, a in enumerate(out.attentions)}
            arrays |= {f"hidden_{i}": h.numpy() for i, h in enumerate(out.hidden_states)}
            np.savez(target, **arrays)
    elapsed = time.perf_counter() - start
    return elapsed, sum(target.stat().st_size for target in targets)


def main() -> None:
    parser = minilm_parser(__doc__)
    parser.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    parser.add_argument("--parts", action="store_true", help="add the part-by-part rows")
    parser.add_argument("--durable", action="store_true",
                        help="add a row for StoreOptions(durable=True): fsync at every commit")
    parser.set_defaults(batches=20)  # a trace streams many batches; open and close count once
    args = parser.parse_args()
    model, tokenizer = torch_minilm(args.attn)
    inputs = encode(tokenizer, args.batch_size, args.tokens)
    methods: dict[str, Callable] = {
        "plain forward": run_plain, "layerscope -> zarr": run_layerscope,
        "  compress every variable": partial(
            run_layerscope, compression=Compression("lz4", 5, "shuffle", min_saving=0)),
    }
    if args.durable:
        methods["  durable commits"] = partial(run_layerscope, durable=True)
    if args.parts:
        methods["  hooks only"] = partial(run_part, owner=Recorder, name="put")
        methods["  copied only"] = partial(run_part, owner=TraceWriter, name="_write")
    if args.attn == "eager":  # HF cannot return attention maps from fused attention
        methods["output_* + np.savez"] = run_savez
    times: dict[str, list[float]] = {name: [] for name in methods}
    stored: dict[str, int] = {}
    peaks: dict[str, int] = {name: 0 for name in methods}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for method in methods.values():  # warm up every path once
            method(model, inputs, 1, workdir)
        for _ in range(args.trials):
            for name, method in methods.items():
                with PeakRSS() as rss:
                    elapsed, size = method(model, inputs, args.batches, workdir)
                os.sync()  # untimed: the savez row's page cache is not written back in the next
                times[name].append(elapsed / args.batches)
                stored[name] = size // args.batches
                peaks[name] = max(peaks[name], rss.peak)
    plain = statistics.median(times["plain forward"])
    print(f"all-MiniLM-L6-v2, {args.attn} attention, batch {args.batch_size} x {args.tokens} "
          f"tokens, {args.batches} batches x {args.trials} trials, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'method':<22} {'ms/batch':>9} {'vs plain':>9} {'stored/batch':>13} {'peak RSS':>10}")
    for name in methods:
        median = statistics.median(times[name])
        print(f"{name:<22} {median * 1e3:>9.1f} {median / plain:>8.2f}x "
              f"{stored.get(name, 0) / 2**20:>10.1f} MB {peaks[name] / 2**20:>7.0f} MB")


if __name__ == "__main__":
    main()
