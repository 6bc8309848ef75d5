"""Memory stays flat however many batches a trace streams: peak RSS for 2 vs 100 batches.

Each count runs in its own process (peak RSS is per process), tracing all-MiniLM-L6-v2 with
every module output and every attention map to a Zarr store on disk.

    python benchmarks/streaming_memory.py [--counts 2 100] [--batch-size 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, shutil, sys, time, torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import layerscope
from layerscope.loading import minilm_folder
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
count, batch, tokens, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
folder = minilm_folder()
tok = AutoTokenizer.from_pretrained(str(folder))
model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
inputs = tok(["streaming keeps memory flat " * 40] * batch, padding="max_length",
             truncation=True, max_length=tokens, return_tensors="pt")
with torch.no_grad():
    model(**inputs)  # warm up before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with layerscope.trace(model, path, mode="w"), torch.no_grad():
    for _ in range(count):
        model(**inputs)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
shutil.rmtree(path)
print(json.dumps({"batches": count, "peak_kb": peak, "base_kb": base, "seconds": elapsed,
                  "stored_bytes": size}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 100])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(count), str(args.batch_size), str(args.tokens),
                 f"{tmp}/trace.zarr"], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"all-MiniLM-L6-v2, every module output + attention, batch {args.batch_size} x "
          f"{args.tokens} tokens, one process per row")
    print(f"{'batches':>8} {'written':>10} {'peak RSS':>10} {'growth in trace':>16} {'vs first':>9}")
    for row in rows:
        growth = row["peak_kb"] - row["base_kb"]
        print(f"{row['batches']:>8} {row['stored_bytes'] / 2**30:>8.2f} GB "
              f"{row['peak_kb'] / 1024:>7.0f} MB {growth / 1024:>13.0f} MB "
              f"{row['peak_kb'] / first['peak_kb']:>8.2f}x")


if __name__ == "__main__":
    main()
