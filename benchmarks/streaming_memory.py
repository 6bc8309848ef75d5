"""Memory stays flat however many batches a trace streams: peak RSS for 2 vs 100 batches.

Each count runs in its own process (peak RSS is per process), tracing all-MiniLM-L6-v2 with
every module output and every attention map to a Zarr store on disk.

    python benchmarks/streaming_memory.py [--counts 2 100] [--batch-size 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from _common import texts

CHILD = r"""
import json, os, resource, shutil, sys, time, torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import layerscope
from layerscope.loading import minilm_folder
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
count, batch, tokens, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
texts = json.loads(sys.argv[5])
folder = minilm_folder()
tok = AutoTokenizer.from_pretrained(str(folder))
model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
inputs = tok(texts, padding="max_length",
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


def run(count: int, args: argparse.Namespace, path: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(count), str(args.batch_size), str(args.tokens), path,
         json.dumps(texts(args.batch_size))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 100])
    parser.add_argument("--repeats", type=int, default=3, help="processes per count")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {count: [] for count in args.counts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so machine noise hits every count alike
            for count in args.counts:
                runs[count].append(run(count, args, f"{tmp}/trace.zarr"))
    print(f"all-MiniLM-L6-v2, every module output + attention, batch {args.batch_size} x "
          f"{args.tokens} tokens, {args.repeats} processes per count")
    print(f"{'batches':>8} {'written':>10} {'peak RSS median':>16} {'max':>8} "
          f"{'growth in trace median':>23} {'max':>8} {'median vs first':>16}")
    first = statistics.median(r["peak_kb"] for r in runs[args.counts[0]])
    for count, rows in runs.items():
        peaks = [r["peak_kb"] / 1024 for r in rows]
        growth = [(r["peak_kb"] - r["base_kb"]) / 1024 for r in rows]
        print(f"{count:>8} {rows[0]['stored_bytes'] / 2**30:>8.2f} GB "
              f"{statistics.median(peaks):>13.0f} MB {max(peaks):>5.0f} MB "
              f"{statistics.median(growth):>20.0f} MB {max(growth):>5.0f} MB "
              f"{statistics.median(peaks) * 1024 / first:>15.2f}x")


if __name__ == "__main__":
    main()
