"""Many captured sites: cost per captured tensor, files on disk, open, info and close.

Random-weight models on the CPU, measured side by side in one process and interleaved trial
by trial (median of ``--trials``):

  mlp        400 residual MLP blocks (fc1, GELU, fc2), tensors of 4 x 16 x 64: every module
             captured, 1,601 variables; plain forward vs capture (the time per batch
             includes opening and closing the store, and so creating every array), and vs
             capture once the store exists (``--warm`` batches untimed first: the cost per
             captured tensor); each against a plain sequential write of the same bytes
             (one file, after the same untimed batches), timed until the writes return and
             until they are on the disk: where the disk cannot take the bytes as fast as the
             model makes them, no capture can be faster; the files the store holds per
             variable and the time its close takes; and a trace of one batch: its close
             (every array created, every chunk written) and the disk its store takes,
             against a plain loop making the same folders and files (the file system's
             floor under that close)
  llama      a Llama-style model (16 layers, hidden 256, batch 4 x 128 tokens), every module
             captured; plain forward vs capture (the store's creation and close included) vs
             capture once the store exists (2 batches untimed first) vs a plain sequential
             write of the same bytes (one file, the time per batch until the writes return
             and until they are on the disk)
  open/info  a store of 2,000 variables (500 blocks): layerscope.open_trace vs
             xarray.open_zarr(consolidated=True) on the same store; `layerscope info` in the
             process (what the command does after its imports) and as a command

    python benchmarks/many_sites.py [--batches 20] [--llama-batches 10] [--trials 5] [--threads N]
                                    [--skip-llama]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import folder_bytes, fresh

import layerscope
from layerscope.core.info import format_summary, summarize


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, width)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class Blocks(torch.nn.Module):
    """``count`` residual MLP blocks: 4 captured outputs each, and the model's own."""

    def __init__(self, count: int, width: int = 64) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def llama() -> tuple[Any, dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                         max_position_embeddings=256, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


Run = Callable[[int, Path], dict[str, float]]
#: untimed batches before the Llama-style model's steady-state row: its arrays exist then
LLAMA_WARM = 2
#: the floor under a one-batch close: the file system making that store's folders and files
FILES_ROW = "mlp store's files, 1 batch"


def plain(model: Any, inputs: Any) -> Run:
    def run(batches: int, workdir: Path) -> dict[str, float]:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(batches):
                call(model, inputs)
        return {"time": time.perf_counter() - start}
    return run


def call(model: Any, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def capture(model: Any, inputs: Any) -> Run:
    def run(batches: int, workdir: Path) -> dict[str, float]:
        path = fresh(workdir, "trace.zarr")
        start = time.perf_counter()
        with torch.no_grad():
            traced = layerscope.trace(model, path)
            with traced:
                for _ in range(batches):
                    call(model, inputs)
                closing = time.perf_counter()
            end = time.perf_counter()
        arrays = [p for p in path.iterdir() if (p / "zarr.json").is_file()]
        files = sum(len(files) for _, _, files in os.walk(path))
        allocated = sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())
        return {"time": end - start, "close": end - closing, "bytes": folder_bytes(path),
                "allocated": allocated, "files": files, "variables": len(arrays),
                "per variable": max(sum(1 for _ in os.scandir(p)) for p in arrays)}
    return run


def capture_steady(model: Any, inputs: Any, warm: int) -> Run:
    """Capture's cost per batch once the store exists and its gathered chunks reuse memory:
    ``warm`` batches untimed (array creation, the first groups' fresh chunk memory), then the
    timed ones; the close untimed."""
    def run(batches: int, workdir: Path) -> dict[str, float]:
        path = fresh(workdir, "steady.zarr")
        with torch.no_grad(), layerscope.trace(model, path):
            for _ in range(warm):
                call(model, inputs)
            start = time.perf_counter()
            for _ in range(batches):
                call(model, inputs)
            elapsed = time.perf_counter() - start
        return {"time": elapsed}
    return run


def sequential_write(nbytes: int, warm: int = 0) -> Run:
    """One file, ``nbytes`` a batch, written as one ``write`` per batch: the time the writes
    take to return (``time``: the page cache may hold them, at memory speed, or make the
    writer wait for the disk) and the time until they are on the disk (``synced``: fsync
    included). ``warm`` batches are written and synced untimed first, as the steady-state
    capture row writes them."""
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)

    def run(batches: int, workdir: Path) -> dict[str, float]:
        path = fresh(workdir, "plain.bin")
        with open(path, "wb") as file:
            for _ in range(warm):
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
            start = time.perf_counter()
            for _ in range(batches):
                file.write(data)
            file.flush()
            written = time.perf_counter()
            os.fsync(file.fileno())
            synced = time.perf_counter()
        return {"time": written - start, "synced": synced - start}
    return run


def layout(store: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The folders of ``store`` (parents first) and its files with the bytes each has on the
    disk (a hole is no bytes)."""
    folders, files = [], []
    for folder, _, names in os.walk(store):
        relative = os.path.relpath(folder, store)
        folders.append(relative)
        files += [(os.path.join(relative, name), os.stat(os.path.join(folder, name)).st_blocks
                   * 512) for name in names]
    return folders, files


def make_files(folders: list[str], files: list[tuple[str, int]]) -> Run:
    """A plain loop on one thread that makes ``folders`` and writes ``files`` (path, bytes):
    what the file system alone takes for a close that creates every array."""
    payload = memoryview(bytes(max((size for _, size in files), default=0)))

    def run(batches: int, workdir: Path) -> dict[str, float]:
        root = fresh(workdir, "files")
        start = time.perf_counter()
        for folder in folders:
            os.mkdir(root / folder)
        for name, size in files:
            with open(root / name, "wb") as file:
                file.write(payload[:size])
        return {"time": time.perf_counter() - start}
    return run


def batches_of(name: str, args: argparse.Namespace) -> int:
    """The batches a trial of row ``name`` runs."""
    return args.llama_batches if name.startswith("llama") else \
        1 if name.endswith("1 batch") else args.batches


def interleaved(rows: dict[str, Run], batches: dict[str, int], trials: int, workdir: Path
                ) -> dict[str, list[dict[str, float]]]:
    for run in rows.values():  # warm up every path once
        run(1, workdir)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
    for trial in range(trials):
        for name, run in rows.items():
            results[name].append(run(batches[name], workdir))
            os.sync()  # untimed: no row pays for the page cache an earlier row left
        print(f"trial {trial + 1}: " + ", ".join(
            f"{name} {results[name][-1]['time'] / batches[name] * 1e3:.0f} ms/batch"
            for name in rows), flush=True)
    return results


def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def timed(action: Callable[[], Any], trials: int) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--llama-batches", type=int, default=10,
                        help="batches per trial of the Llama rows (180 MB each)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warm", type=int, default=32,
                        help="untimed batches before the steady-state capture row's timed ones "
                        "(two groups of gathered chunks: at most 16 batches each)")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 keeps a forward on a "
                        "machine busy with other work from waiting on its own threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore", UserWarning)
    mlp, x = Blocks(400).eval(), torch.randn(4, 16, 64)
    with tempfile.TemporaryDirectory(dir=os.environ.get("LAYERSCOPE_BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        probe = capture(mlp, x)(args.batches, workdir)
        mlp_bytes = int(probe["bytes"]) // args.batches
        one_batch = fresh(workdir, "one.zarr")
        with torch.no_grad(), layerscope.trace(mlp, one_batch):
            call(mlp, x)
        rows: dict[str, Run] = {
            "mlp plain": plain(mlp, x), "mlp capture": capture(mlp, x),
            "mlp capture, 1 batch": capture(mlp, x),
            FILES_ROW: make_files(*layout(one_batch)),
            "mlp sequential write": sequential_write(mlp_bytes),
            f"mlp capture after {args.warm}": capture_steady(mlp, x, args.warm),
            f"mlp sequential write after {args.warm}": sequential_write(mlp_bytes, args.warm)}
        if not args.skip_llama:
            model, inputs = llama()
            rows["llama plain"], rows["llama capture"] = plain(model, inputs), \
                capture(model, inputs)
            rows[f"llama capture after {LLAMA_WARM}"] = capture_steady(model, inputs, LLAMA_WARM)
            probe = capture(model, inputs)(1, workdir)
            rows["llama sequential write"] = sequential_write(int(probe["bytes"]))
        batches = {name: batches_of(name, args) for name in rows}
        results = interleaved(rows, batches, args.trials, workdir)
        store = fresh(workdir, "2000.zarr")
        wide = Blocks(500).eval()
        with torch.no_grad(), layerscope.trace(wide, store, capture=["blocks.*"]):
            for _ in range(2):
                wide(x)
        open_zarr, open_trace, info, command = measure_open(store, args.trials)
        report(args, results, open_zarr, open_trace, info, command, store)


def measure_open(store: Path, trials: int) -> tuple[float, float, float, float]:
    import xarray as xr

    xr.open_zarr(store, consolidated=True)  # warm: imports and the page cache
    layerscope.open_trace(store)
    zarr_s, trace_s = [], []
    for _ in range(trials):  # interleaved, like the rows above
        zarr_s.append(timed(lambda: xr.open_zarr(store, consolidated=True), 1))
        trace_s.append(timed(lambda: layerscope.open_trace(store), 1))
    info = timed(lambda: format_summary(summarize(store)), trials)
    command = timed(lambda: subprocess.run([sys.executable, "-m", "layerscope", "info",
                                            str(store)], check=True, capture_output=True), 3)
    return statistics.median(zarr_s), statistics.median(trace_s), info, command


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]],
           open_zarr: float, open_trace: float, info: float, command: float,
           store: Path) -> None:
    per = {name: median(rows, "time") / batches_of(name, args) for name, rows in results.items()}
    mlp = results["mlp capture"]
    print(f"{args.batches} batches (llama: {args.llama_batches}) x {args.trials} trials, torch "
          f"threads {torch.get_num_threads()}; medians")
    print(f"{'row':<34} {'ms/batch':>9} {'vs plain':>9}")
    for name in results:
        if name == FILES_ROW:  # no forward in it: reported with the close below
            continue
        base = per["mlp plain"] if name.startswith("mlp") else per.get("llama plain", 1.0)
        print(f"{name:<34} {per[name] * 1e3:>9.1f} {per[name] / base:>8.2f}x")
    print("sequential writes of the same bytes, ms/batch: until the writes return (page "
          "cache) / until they are on the disk (fsync); capture against each")
    steady = f"after {args.warm}"
    for model, capture_row, write_row in (
            ("mlp", "mlp capture", "mlp sequential write"),
            ("mlp", f"mlp capture {steady}", f"mlp sequential write {steady}"),
            ("llama", "llama capture", "llama sequential write"),
            ("llama", f"llama capture after {LLAMA_WARM}", "llama sequential write")):
        if write_row not in results:
            continue
        count = args.llama_batches if model == "llama" else args.batches
        written, synced = per[write_row], median(results[write_row], "synced") / count
        print(f"  {write_row:<31} {written * 1e3:7.1f} / {synced * 1e3:7.1f}   {capture_row}: "
              f"{per[capture_row] / written:.2f}x / {per[capture_row] / synced:.2f}x")
    print(f"bytes a batch: mlp {median(mlp, 'bytes') / args.batches / 2**20:.1f} MB"
          + (f", llama {median(results['llama capture'], 'bytes') / args.llama_batches / 2**20:.1f}"
             f" MB ({median(results['llama capture'], 'variables'):.0f} variables)"
             if "llama capture" in results else ""))
    print(f"mlp store: {median(mlp, 'variables'):.0f} variables, "
          f"{median(mlp, 'files'):.0f} files, at most {median(mlp, 'per variable'):.0f} files "
          f"in one variable's folder, {median(mlp, 'bytes') / 2**20:.1f} MB")
    print(f"close (the mlp store, {args.batches} batches): {median(mlp, 'close'):.3f} s")
    one = results["mlp capture, 1 batch"]
    print(f"close (the mlp store, 1 batch): {median(one, 'close'):.3f} s; its store "
          f"{median(one, 'allocated') / 2**20:.1f} MB on the disk "
          f"({median(one, 'bytes') / 2**20:.1f} MB in its files' lengths); making its "
          f"{median(one, 'files'):.0f} files and their folders in a plain loop (one thread, "
          f"the bytes each has on the disk): {median(results[FILES_ROW], 'time'):.3f} s")
    if "llama capture" in results:
        print(f"close (the llama store): {median(results['llama capture'], 'close'):.3f} s")
    variables = sum(1 for p in store.iterdir() if (p / "zarr.json").is_file())
    print(f"open, {variables} arrays: open_trace {open_trace:.3f} s, xarray.open_zarr "
          f"{open_zarr:.3f} s, {open_trace / open_zarr:.2f}x")
    print(f"layerscope info: {info:.3f} s in the process, {command:.3f} s as a command "
          "(Python start and imports included)")


if __name__ == "__main__":
    main()
