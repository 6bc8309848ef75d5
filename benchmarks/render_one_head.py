"""Render one attention head from a trace of several GB: time and peak memory.

    python benchmarks/render_one_head.py            # 24 layers x 16 heads x 2048^2, ~6 GB
    python benchmarks/render_one_head.py --layers 2 --tokens 512   # a quick smoke run

Writes a trace with the real streaming writer (row-normalised random attention, the same
chunking a capture would choose), then, each in a fresh process so peak RSS is its own:

* ``one-head``: ``layerscope render attention TRACE --layer L --head H -o head.png`` via the
  Python API (open, draw, save);
* ``whole-variable``: the naive way, ``ds[var].values`` (the one layer, all heads, all
  samples) and then the same picture from the in-memory array.

Prints a Markdown table (time, peak RSS, bytes read from disk) and the ratios; deletes the
trace afterwards unless ``--keep``. Targets: one head under 2 s and under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(path: Path, layers: int, heads: int, tokens: int, samples: int) -> float:
    import layerscope
    from layerscope.core import Recorder, Selection
    from layerscope.core.format import new_group_attrs
    from layerscope.core.store import open_group_for_writing
    from layerscope.core.writer import TraceWriter

    attrs = new_group_attrs("numpy", np.__version__, {"class": "synthetic-attention"},
                            Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    writer = TraceWriter(group, layerscope.StoreOptions(mode="w"))
    recorder = Recorder(writer, Selection(), "numpy", lambda ids: [f"tok{i}" for i in ids])
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    try:
        for _ in range(samples):  # one pass per sample keeps the generator's memory flat
            recorder.begin_pass(1, np.arange(tokens)[None])
            for layer in range(layers):
                weights = rng.random((1, heads, tokens, tokens), dtype=np.float32)
                weights **= 4  # peakier rows, as trained heads have
                weights /= weights.sum(axis=-1, keepdims=True)
                recorder.put(f"model.layers.{layer}.self_attn", "attention", weights,
                             ("batch", "head", "query", "key"), "Attention")
                del weights
            recorder.end_pass()
    finally:
        recorder.close()
    return time.perf_counter() - started


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _io_read_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, path: str, layer: int, head: int, out: str) -> dict[str, float]:
    """Runs in a child process: open, read, draw, save; returns time and memory."""
    started = time.perf_counter()
    import dask.array  # noqa: F401  (the libraries a render needs, timed apart)
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import layerscope
    from layerscope.renderers import attention_heatmap, limit_read_threads, save

    limit_read_threads()  # as `layerscope render` does, before the first read
    imports = time.perf_counter() - started
    rss_imports = _peak_rss_mb()
    io_before = _io_read_bytes()
    cpu_started = time.process_time()  # all threads: robust to other processes' load
    started = time.perf_counter()
    ds = layerscope.open_trace(path)
    name = f"model.layers.{layer}.self_attn@attention"
    if mode == "one-head":
        fig = attention_heatmap(ds, layer=layer, head=head, sample=0)
        drawn = time.perf_counter()
    else:
        everything = ds[name].values  # the naive way: the whole variable in memory
        import xarray as xr

        memory = xr.Dataset({name: (ds[name].dims, everything)}, attrs=ds.attrs)
        memory = memory.assign_coords(token_text=ds["token_text"].load())
        fig = attention_heatmap(memory, variable=name, head=head, sample=0)
        drawn = time.perf_counter()
    save(fig, out)
    done = time.perf_counter()
    cpu = time.process_time() - cpu_started
    peak = _peak_rss_mb()
    read = _io_read_bytes() - io_before if io_before >= 0 else -1
    return {"seconds": done - started, "cpu_s": cpu, "read_and_draw_s": drawn - started,
            "save_png_s": done - drawn, "imports_s": imports, "peak_rss_mb": peak,
            "rss_after_imports_mb": rss_imports,
            "disk_read_mb": read / 2**20 if read >= 0 else -1}


def run_child(mode: str, path: Path, layer: int, head: int, out: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", mode, "--path", str(path),
               "--layer", str(layer), "--head", str(head), "--out", str(out)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--layer", type=int, default=None, help="layer to draw (default: middle)")
    parser.add_argument("--head", type=int, default=5)
    parser.add_argument("--path", help="where to write the trace (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the trace afterwards")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (best is shown)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layer = args.layer if args.layer is not None else args.layers // 2
    if args.measure:
        print(json.dumps(measure(args.measure, args.path, layer, args.head, args.out)))
        return

    folder = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="layerscope-bench-"))
    trace = folder / "big.zarr" if not args.path else folder
    try:
        seconds = generate(trace, args.layers, args.heads, args.tokens, args.samples)
        size = disk_bytes(trace)
        raw = 4 * args.layers * args.heads * args.tokens**2 * args.samples
        print(f"trace: {args.layers} layers x {args.heads} heads x {args.tokens}^2 x "
              f"{args.samples} sample(s), float32: {raw / 2**30:.2f} GiB raw, "
              f"{size / 2**30:.2f} GiB on disk, written in {seconds:.1f} s")
        results = {}
        with tempfile.TemporaryDirectory() as scratch:
            for mode in ("one-head", "whole-variable"):
                runs = [run_child(mode, trace, layer, args.head, Path(scratch) / f"{mode}.png")
                        for _ in range(args.repeat)]
                results[mode] = min(runs, key=lambda r: r["seconds"])
                results[mode]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        print()
        print("| what | wall time (s) | CPU time (s) | of which read + draw (s) | save PNG (s) "
              "| imports before (s) | peak RSS (MB) | RSS after imports (MB) "
              "| read from disk (MB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mode, r in results.items():
            print(f"| {mode} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | {r['read_and_draw_s']:.2f} | "
                  f"{r['save_png_s']:.2f} | {r['imports_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['rss_after_imports_mb']:.0f} | {r['disk_read_mb']:.0f} |")
        load = os.getloadavg()[0]
        print(f"\n(load average during the run: {load:.1f} on {os.cpu_count()} cores)")
        one, whole = results["one-head"], results["whole-variable"]
        print()
        print(f"one head vs whole variable: time x{whole['seconds'] / one['seconds']:.1f} "
              f"faster, peak RSS x{whole['peak_rss_mb'] / one['peak_rss_mb']:.1f} smaller")
        print(f"targets: time {one['seconds']:.2f} s wall, {one['cpu_s']:.2f} s CPU (< 2 s: "
              f"{'met' if one['seconds'] < 2 else 'MISSED'}), peak RSS "
              f"{one['peak_rss_mb']:.0f} MB (< 300 MB: "
              f"{'met' if one['peak_rss_mb'] < 300 else 'MISSED'})")
    finally:
        if not args.keep:
            shutil.rmtree(trace if args.path else folder, ignore_errors=True)
            if not os.path.exists(trace):
                print(f"deleted {trace}")


if __name__ == "__main__":
    main()
