"""Which compression to use by default: the CPU time a writer thread spends compressing, and
the bytes it saves, for Blosc settings on real activations (all-MiniLM-L6-v2 attention maps and
hidden states, batch 8 x 128 tokens of eight different texts).

CPU time is what matters: while a model keeps every core busy, each millisecond the writer
spends compressing comes out of the model's time (see capture_overhead.py). Each setting
compresses every array as one chunk on one thread, as the writer does; the rows are measured in
one run, interleaved over trials. Decompression (what reading and rendering pay) is timed too.

    python benchmarks/codecs.py [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import torch
from _common import texts, torch_minilm
from numcodecs import Blosc

from layerscope.core import Compression

SETTINGS = {
    "lz4 1 noshuffle (default)": Compression("lz4", 1, "noshuffle"),
    "lz4 5 shuffle": Compression("lz4", 5, "shuffle"),
    "lz4 5 bitshuffle": Compression("lz4", 5, "bitshuffle"),
    "lz4 9 shuffle": Compression("lz4", 9, "shuffle"),
    "blosclz 5 shuffle": Compression("blosclz", 5, "shuffle"),
    "zstd 1 shuffle": Compression("zstd", 1, "shuffle"),
    "zstd 1 bitshuffle": Compression("zstd", 1, "bitshuffle"),
}
SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def activations() -> dict[str, list[np.ndarray]]:
    """Real MiniLM tensors of four kinds, batch 8 x 128 tokens."""
    model, tokenizer = torch_minilm()
    mlp: list[np.ndarray] = []
    for layer in model.encoder.layer:  # the GELU outputs, 1536 wide
        layer.intermediate.register_forward_hook(lambda m, i, o: mlp.append(o.numpy().copy()))

    def run(batch: list[str]) -> object:
        inputs = tokenizer(batch, padding="max_length", truncation=True, max_length=128,
                           return_tensors="pt")
        with torch.no_grad():
            return model(**inputs, output_attentions=True, output_hidden_states=True)

    full = run(texts(8))
    padded = run(texts(8, repeat=2))  # two sentences each: about a third of 128 tokens
    return {
        "hidden states": [h.numpy() for h in full.hidden_states],
        "attention, full length": [a.numpy() for a in full.attentions],
        "attention, padded": [a.numpy() for a in padded.attentions],
        "MLP (GELU) outputs": mlp[:6],
    }


def measure(arrays: list[np.ndarray], setting: Compression) -> tuple[float, float, int]:
    """CPU seconds to compress and to decompress ``arrays`` on one thread, and bytes stored."""
    codec = Blosc(cname=setting.cname, clevel=setting.clevel, shuffle=SHUFFLE[setting.shuffle],
                  blocksize=setting.blocksize, typesize=4)
    result: list[float | int] = []

    def run() -> None:  # off the main thread, where Blosc uses one thread, as in the writer
        start = time.thread_time()
        encoded = [codec.encode(a) for a in arrays]
        middle = time.thread_time()
        for data in encoded:
            codec.decode(data)
        result.extend([middle - start, time.thread_time() - middle, sum(map(len, encoded))])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return float(result[0]), float(result[1]), int(result[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    kinds = activations()
    cost: dict[tuple[str, str], list[tuple[float, float]]] = {}
    sizes: dict[tuple[str, str], float] = {}
    for _ in range(args.trials):
        for kind, arrays in kinds.items():
            for name, setting in SETTINGS.items():
                encode, decode, stored = measure(arrays, setting)
                cost.setdefault((kind, name), []).append((encode, decode))
                sizes[kind, name] = stored / sum(a.nbytes for a in arrays)
    print(f"MiniLM activations, batch 8 x 128 tokens, {args.trials} trials, one thread")
    for kind, arrays in kinds.items():
        raw = sum(a.nbytes for a in arrays)
        print(f"\n{kind}: {len(arrays)} arrays, {raw / 2**20:.1f} MB")
        print(f"{'setting':<26} {'compress ms':>12} {'MB/s':>6} {'decompress ms':>14} "
              f"{'stored/raw':>11}")
        for name in SETTINGS:
            encode = statistics.median(c[0] for c in cost[kind, name])
            decode = statistics.median(c[1] for c in cost[kind, name])
            print(f"{name:<26} {encode * 1e3:>12.1f} {raw / 2**20 / encode:>6.0f} "
                  f"{decode * 1e3:>14.1f} {sizes[kind, name]:>11.3f}")


if __name__ == "__main__":
    main()
