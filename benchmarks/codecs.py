"""Which compression to use by default: write speed and ratio of Blosc settings on real
activations (all-MiniLM-L6-v2 attention maps and hidden states, batch 8 x 128 tokens).

Each setting writes the same arrays through zarr with the crc32c checksum; the rows are
measured in one run, interleaved over trials, and printed relative to no compression.

    python benchmarks/codecs.py [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from layerscope.core import Compression
from layerscope.loading import minilm_folder

SETTINGS = {
    "none (crc32c only)": Compression(enabled=False),
    "lz4 1 shuffle": Compression("lz4", 1, "shuffle"),
    "lz4 5 shuffle": Compression("lz4", 5, "shuffle"),
    "lz4 5 bitshuffle": Compression("lz4", 5, "bitshuffle"),
    "zstd 1 shuffle": Compression("zstd", 1, "shuffle"),
    "zstd 3 shuffle": Compression("zstd", 3, "shuffle"),
    "zstd 1 bitshuffle": Compression("zstd", 1, "bitshuffle"),
}


def activations() -> dict[str, np.ndarray]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    texts = ["compression settings are chosen by measuring them on real tensors " * 12] * 8
    inputs = tokenizer(texts, padding="max_length", truncation=True, max_length=128,
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    arrays = {f"attention_{i}": a.numpy() for i, a in enumerate(out.attentions)}
    arrays |= {f"hidden_{i}": h.numpy() for i, h in enumerate(out.hidden_states)}
    return arrays


def write(arrays: dict[str, np.ndarray], setting: Compression, path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    group = zarr.open_group(path, mode="w", zarr_format=3)
    for name, data in arrays.items():
        array = group.create_array(name, shape=data.shape, chunks=data.shape, dtype=data.dtype,
                                   compressors=setting.codecs())
        array[...] = data
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path)
    return elapsed, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    arrays = activations()
    raw = sum(a.nbytes for a in arrays.values())
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.trials):
            for name, setting in SETTINGS.items():
                elapsed, sizes[name] = write(arrays, setting, Path(tmp) / "c.zarr")
                times[name].append(elapsed)
    base = statistics.median(times["none (crc32c only)"])
    print(f"{raw / 2**20:.1f} MB of MiniLM activations, {args.trials} trials")
    print(f"{'setting':<20} {'MB/s':>7} {'time vs none':>13} {'stored/raw':>11}")
    for name in SETTINGS:
        median = statistics.median(times[name])
        print(f"{name:<20} {raw / 2**20 / median:>7.0f} {median / base:>12.2f}x "
              f"{sizes[name] / raw:>10.2f}")


if __name__ == "__main__":
    main()
