"""Capture overhead on all-MiniLM-L6-v2 in keras-hub (TensorFlow, CPU): batch 8 x 128 tokens.

The packaged Hugging Face weights are loaded into keras-hub's ``BertBackbone``. Three ways of
running the same batches, measured side by side in one process and interleaved trial by trial
so that machine noise hits all of them alike:

  plain             model(inputs), eager
  layerscope eager  the same calls while every attention map and every block output streams
                    to a Zarr store (time per batch includes closing the store)
  plain predict     model.predict(...) (a tf.function graph), one batch per step
  layerscope predict the same predict call, captured from inside the graph

A trace block makes ``model.predict`` trace its graph again, once, with the capture in it; that
one-time cost is printed on its own line and left out of the per-batch times.

Prints the median and the best time per batch, each as a ratio to the plain run of the same
kind (the best of several trials is the least disturbed by other work on the machine).
Every trace goes to a new path; none is deleted before the script ends (see
``_common.fresh``).

    python benchmarks/capture_overhead_tensorflow.py [--batches 10] [--trials 5]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import encode, folder_bytes, fresh, minilm_parser

# the block outputs (hidden states) and the attention maps, as in the PyTorch benchmark
CAPTURE = ["embeddings_layer_norm@output", "transformer_layers.[0-9]@output",
           "transformer_layers.*.self_attention_layer@attention"]


def main() -> None:
    args = minilm_parser(__doc__).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import layerscope
    from layerscope.backends.tensorflow import load_hf_folder
    from layerscope.loading import minilm_folder

    model, tokenizer = load_hf_folder(minilm_folder())
    one = encode(tokenizer, args.batch_size, args.tokens, "np")
    many = {k: np.concatenate([v] * args.batches) for k, v in one.items()}

    def eager(batches: int) -> None:
        for _ in range(batches):
            model(one, training=False)

    def predict(batches: int) -> None:
        model.predict({k: v[:batches * args.batch_size] for k, v in many.items()},
                      batch_size=args.batch_size, verbose=0)

    def plain(run: Callable[[int], None]) -> Callable[[int], tuple[float, int, float]]:
        def go(batches: int) -> tuple[float, int, float]:
            start = time.perf_counter()
            run(batches)
            return time.perf_counter() - start, 0, 0.0
        return go

    def traced(run: Callable[[int], None], workdir: Path,
               graph: bool) -> Callable[[int], tuple[float, int, float]]:
        """Time ``batches`` captured calls, closing the store included. A graph (predict) is
        traced again once per block, with the capture in it: that one-time cost is timed
        apart, on a first one-batch call inside the block, and left out of the batch time."""
        def go(batches: int) -> tuple[float, int, float]:
            path = fresh(workdir, "trace.zarr")
            setup = 0.0
            start = time.perf_counter()
            with layerscope.trace(model, path, CAPTURE, mode="w"):
                if graph:
                    run(1)
                    setup = time.perf_counter() - start
                    start = time.perf_counter()
                run(batches)
            elapsed = time.perf_counter() - start
            return elapsed, folder_bytes(path) // (batches + graph), setup
        return go

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        methods: dict[str, Callable[[int], tuple[float, int, float]]] = {
            "plain model(x)": plain(eager), "layerscope model(x)": traced(eager, workdir, False),
            "plain predict": plain(predict), "layerscope predict": traced(predict, workdir, True),
        }
        baseline = {"layerscope model(x)": "plain model(x)", "layerscope predict": "plain predict"}
        times: dict[str, list[float]] = {name: [] for name in methods}
        setups: list[float] = []
        stored: dict[str, int] = {}
        for method in methods.values():  # warm up every path (and trace every graph) once
            method(1)
        for _ in range(args.trials):
            for name, method in methods.items():
                elapsed, size, setup = method(args.batches)
                times[name].append(elapsed / args.batches)
                stored[name] = size
                if setup:
                    setups.append(setup - min(times["plain predict"]))
    import tensorflow as tf

    print(f"all-MiniLM-L6-v2 (keras-hub BertBackbone), batch {args.batch_size} x {args.tokens} "
          f"tokens, {args.batches} batches x {args.trials} trials, TensorFlow {tf.__version__}, "
          f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}")
    print(f"{'method':<22} {'median ms':>10} {'vs plain':>9} {'best ms':>9} {'vs plain':>9} "
          f"{'stored/batch':>13}")
    for name in methods:
        plain = times[baseline.get(name, name)]
        median, best = statistics.median(times[name]), min(times[name])
        print(f"{name:<22} {median * 1e3:>10.1f} {median / statistics.median(plain):>8.2f}x "
              f"{best * 1e3:>9.1f} {best / min(plain):>8.2f}x "
              f"{stored.get(name, 0) / 2**20:>10.1f} MB")
    print(f"once per trace block, retracing predict with the capture in it: "
          f"{statistics.median(setups) * 1e3:.0f} ms (median; best {min(setups) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
