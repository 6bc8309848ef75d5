"""Capture overhead on all-MiniLM-L6-v2 in Flax NNX (JAX, CPU): batch 8 x 128 tokens.

The packaged Hugging Face weights are loaded into the NNX port of BERT
(examples/minilm/flax_bert.py). Four ways of running the same batches, measured side by side
in one process and interleaved trial by trial so that machine noise hits all of them alike:

  plain eager        model(**inputs), op by op
  layerscope eager   the same calls while every attention map and every block output streams
                     to a Zarr store (time per batch includes closing the store)
  plain jit          nnx.jit(model call), one compiled XLA computation per batch
  layerscope jit     the same compiled call; captured values leave it as extra outputs,
                     through the model's state, which nnx.jit returns (the function is
                     compiled once and stays compiled)
  layerscope hidden jit  the jitted capture of the block outputs alone (no attention maps, so
                     no attention probabilities recomputed next to the fused attention)
  values out only    as layerscope jit, but the values are dropped on the host instead of
                     handed to the writer: what leaving the compiled computation costs,
                     apart from checksumming and writing (which every backend pays alike)
  callback jit       as layerscope jit, but with the model under plain jax.jit (split and
                     merged by hand), where no state comes back: the values leave through
                     one host callback per batch

Every time includes waiting for the results (``jax.block_until_ready``). Prints the median and
best time per batch inside the trace block (every batch's values handed to the writer), its
ratio to the plain run of the same kind, and the time per batch of the whole block, opening the
store and closing it (all bytes on disk) included.
Every trace goes to a new path; none is deleted before the script ends (see
``_common.fresh``).

    python benchmarks/capture_overhead_jax.py [--batches 10] [--trials 5]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import encode, folder_bytes, fresh, minilm_parser, replaced

# the block outputs (hidden states) and the attention maps, as in the PyTorch benchmark
CAPTURE = ["embeddings@output", "encoder.layer.[0-9]@output",
           "encoder.layer.*.attention@attention"]
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = minilm_parser(__doc__).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    import layerscope
    from layerscope.loading import minilm_folder

    sys.path.insert(0, str(ROOT / "examples" / "minilm"))
    from flax_bert import FlaxBertModel

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = FlaxBertModel.from_pretrained(folder)
    encoded = encode(tokenizer, args.batch_size, args.tokens, "np")
    inputs = {k: jax.numpy.asarray(v) for k, v in encoded.items()}
    compiled = nnx.jit(lambda m, kw: m(**kw))
    merged = jax.jit(lambda graph, state, kw: nnx.merge(graph, state)(**kw), static_argnums=0)

    def eager(_: Path) -> Any:
        return model(**inputs)

    def jitted(_: Path) -> Any:
        return compiled(model, inputs)

    def jitted_by_hand(_: Path) -> Any:
        graph, state = nnx.split(model)  # split inside the block: the capture is in the graph
        return merged(graph, state, inputs)

    Result = tuple[float, float, int]  # seconds for the batches, seconds in all, bytes

    def plain(call: Callable[[Path], Any]) -> Callable[[Path], Result]:
        def run(workdir: Path) -> Result:
            start = time.perf_counter()
            for _ in range(args.batches):
                jax.block_until_ready(call(workdir))
            elapsed = time.perf_counter() - start
            return elapsed, elapsed, 0
        return run

    def captured(call: Callable[[Path], Any], capture: list[str] = CAPTURE
                 ) -> Callable[[Path], Result]:
        def run(workdir: Path) -> Result:
            path = fresh(workdir, "trace.zarr")
            start = time.perf_counter()
            with layerscope.trace(model, path, capture, mode="w"):
                first = time.perf_counter()
                for _ in range(args.batches):
                    jax.block_until_ready(call(workdir))
                jax.effects_barrier()  # every batch has reached the writer's queue
                batches = time.perf_counter() - first
            elapsed = time.perf_counter() - start
            return batches, elapsed, folder_bytes(path)
        return run

    def dropped(call: Callable[[Path], Any]) -> Callable[[Path], Result]:
        from layerscope.backends import _jax_runtime

        run = captured(call)

        def without_writer(workdir: Path) -> Result:
            with replaced(_jax_runtime.Sink, "deliver", lambda self, batch, ids, items: None):
                return run(workdir)
        return without_writer

    methods = {"plain eager": plain(eager), "layerscope eager": captured(eager),
               "plain jit": plain(jitted), "layerscope jit": captured(jitted),
               "layerscope hidden jit": captured(jitted, CAPTURE[:2]),
               "values out only jit": dropped(jitted),
               "callback jit": captured(jitted_by_hand)}
    times: dict[str, list[float]] = {name: [] for name in methods}
    totals: dict[str, list[float]] = {name: [] for name in methods}
    stored: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for method in methods.values():  # warm up (and compile) every path once
            method(workdir)
        for _ in range(args.trials):
            for name, method in methods.items():
                batches, elapsed, size = method(workdir)
                times[name].append(batches / args.batches)
                totals[name].append(elapsed / args.batches)
                stored[name] = size // args.batches
    medians = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    total = {name: statistics.median(t) for name, t in totals.items()}
    print(f"all-MiniLM-L6-v2 (Flax NNX), batch {args.batch_size} x {args.tokens} tokens, "
          f"{args.batches} batches x {args.trials} trials, jax {jax.__version__} on "
          f"{jax.default_backend()}")
    print("ms/batch: the batches inside the block; with open+close: the whole block per batch")
    print(f"{'method':<21} {'median ms':>9} {'vs plain':>9} {'best ms':>9} {'vs plain':>9} "
          f"{'with open+close':>16} {'stored/batch':>13}")
    for name in methods:
        kind = name.split()[-1]
        base, base_best = medians[f"plain {kind}"], best[f"plain {kind}"]
        print(f"{name:<21} {medians[name] * 1e3:>9.1f} {medians[name] / base:>8.2f}x "
              f"{best[name] * 1e3:>9.1f} {best[name] / base_best:>8.2f}x "
              f"{total[name] * 1e3:>9.1f} ({total[name] / total[f'plain {kind}']:.2f}x) "
              f"{stored.get(name, 0) / 2**20:>8.1f} MB")
    for name in ("layerscope jit", "layerscope hidden jit", "values out only jit",
                 "callback jit"):
        added = medians[name] - medians["plain jit"]
        print(f"{name}: adds {added * 1e3:.1f} ms per batch (median), "
              f"{added / medians['plain jit']:.0%} of the jitted forward "
              f"({added / medians['plain eager']:.0%} of the eager one)")


if __name__ == "__main__":
    main()
