"""Memory of ``layerscope diff`` against trace size: the diff streams, so peak RSS stays flat.

    python benchmarks/diff_memory.py                  # traces of 0.5, 2 and 4 GB
    python benchmarks/diff_memory.py --sizes 0.25 1   # quicker

For each size, two traces of that many GB (uncompressed float32, random values, so the
compressor saves nothing) are written through the real writer into a scratch folder. They have
hidden states (batch, token, hidden), MLP activations (batch, token, neuron) and attention maps
(batch, head, query, key) of 16 MB per sample, so one sample is larger than the read budget.
Trace B equals A except for one perturbed element late in the trace. A fresh process runs
``layerscope.diff`` on them and reports its RSS after imports and its peak RSS. Then the traces
are deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from layerscope.core import Selection, StoreOptions
from layerscope.core.format import new_group_attrs
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter

TOKENS, HIDDEN, NEURONS, HEADS = 512, 1024, 4096, 16
BATCH = 4
PER_SAMPLE = 4 * (TOKENS * HIDDEN + TOKENS * NEURONS + HEADS * TOKENS * TOKENS)
MB = 1 << 20


def write_trace(path: Path, samples: int, base: dict[str, np.ndarray], perturb: bool) -> None:
    attrs = new_group_attrs("numpy", "0", {"class": "benchmark"}, Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    recorder = Recorder(TraceWriter(group, StoreOptions(mode="w")), Selection(), "numpy")
    passes = samples // BATCH
    for index in range(passes):
        recorder.begin_pass(BATCH)
        for layer in range(2):
            for site, (kind, roles) in {
                f"layer.{layer}": ("output", ("batch", "token", "hidden")),
                f"layer.{layer}.mlp": ("output", ("batch", "token", "neuron")),
                f"layer.{layer}.attention": ("attention", ("batch", "head", "query", "key")),
            }.items():
                data = base[roles[-1]] + np.float32(index + layer)  # cheap, distinct per pass
                if perturb and index == passes - 1 and site == "layer.1":
                    data = data.copy()
                    data[-1, -1, -1] += 1.0
                recorder.put(site, kind, data, roles)
        recorder.end_pass()
    recorder.close()


_CHILD = """
import json, sys, time
def status_mb(key):
    # VmHWM (peak RSS) starts afresh at exec; getrusage's ru_maxrss would carry the
    # parent's peak over from the fork
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024
import dask.array, xarray, zarr  # what reading any trace loads, before the baseline
import layerscope
from layerscope.core.diff import diff
before = status_mb('VmRSS')
start = time.perf_counter()
result = diff(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
first = result.first_divergence
print(json.dumps({"before_mb": before, "peak_mb": status_mb('VmHWM'), "seconds": seconds,
                  "pairs": len(result.pairs), "first": first.a if first else None,
                  "blocks": sum(p.blocks for p in result.pairs)}))
"""


def measure(a: Path, b: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(a), str(b)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0, 4.0],
                        help="size of each trace in GB (uncompressed)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="scratch folder for the traces (deleted afterwards)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # 2 layers x 3 variables per pass; each variable's per-pass block is drawn once
    base = {
        "hidden": rng.standard_normal((BATCH, TOKENS, HIDDEN), np.float32),
        "neuron": rng.standard_normal((BATCH, TOKENS, NEURONS), np.float32),
        "key": rng.random((BATCH, HEADS, TOKENS, TOKENS), np.float32),
    }
    print(f"{'each trace':>10}  {'samples':>7}  {'write s':>7}  {'diff s':>7}  {'MiB/s':>6}  "
          f"{'RSS after import':>16}  {'peak RSS':>9}  {'peak - import':>13}  first divergence")
    for size in args.sizes:
        samples = max(BATCH, int(size * (1 << 30) / (2 * PER_SAMPLE)) // BATCH * BATCH)
        nbytes = samples * 2 * PER_SAMPLE
        work = Path(tempfile.mkdtemp(prefix="layerscope-diff-bench-", dir=args.dir))
        try:
            start = time.perf_counter()
            write_trace(work / "a.zarr", samples, base, perturb=False)
            write_trace(work / "b.zarr", samples, base, perturb=True)
            written = time.perf_counter() - start
            stats = measure(work / "a.zarr", work / "b.zarr")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        read_rate = 2 * nbytes / MB / stats["seconds"]  # both traces read
        print(f"{nbytes / (1 << 30):>6.2f} GiB  {samples:>7}  {written:>7.1f}  "
              f"{stats['seconds']:>7.1f}  {read_rate:>6.0f}  {stats['before_mb']:>12.0f} MiB  "
              f"{stats['peak_mb']:>5.0f} MiB  {stats['peak_mb'] - stats['before_mb']:>9.0f} MiB  "
              f"{stats['first']}", flush=True)


if __name__ == "__main__":
    main()
