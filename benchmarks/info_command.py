"""`layerscope info` on a store of 2,001 arrays: as a command and in the process.

The store is many_sites.py's open/info store: 500 residual MLP blocks of 4 x 16 x 64 tensors,
``capture=["blocks.*"]``, 2 batches. Measured side by side, interleaved run by run (median of
``--trials``):

  command     ``python -m layerscope info STORE`` in a new process: Python's start, the
              imports and the summary
  eager       the same command with every public name of layerscope and every command module
              imported first: what the command imported before it imported only its own
  in process  ``format_summary(summarize(STORE))``: what the command does after its imports
  python      ``python -c pass``: Python's own start, the floor of any command

    python benchmarks/info_command.py [--trials 5]
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

import torch
from many_sites import Blocks

import layerscope
from layerscope.core.info import format_summary, summarize

#: the command as it was: every public name and every command module imported, then it runs
EAGER = ("import sys, layerscope, layerscope.cli as cli\n"
         "[getattr(layerscope, name) for name in layerscope.__all__]\n"
         "cli.build_parser()\n"
         "sys.exit(cli.main(sys.argv[1:]))")


def build_store(path: Path) -> int:
    """The 2,001-array store; returns its number of arrays."""
    torch.manual_seed(0)
    model, x = Blocks(500).eval(), torch.randn(4, 16, 64)
    with torch.no_grad(), layerscope.trace(model, path, capture=["blocks.*"]):
        for _ in range(2):
            model(x)
    return sum(1 for p in path.iterdir() if (p / "zarr.json").is_file())


def seconds(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    with tempfile.TemporaryDirectory(dir=os.environ.get("LAYERSCOPE_BENCH_DIR")) as tmp:
        store = Path(tmp) / "2000.zarr"
        arrays = build_store(store)
        expected = format_summary(summarize(store))

        def command(*python: str) -> Callable[[], None]:
            def run() -> None:
                out = subprocess.run([sys.executable, *python, "info", str(store)],
                                     check=True, capture_output=True, text=True)
                assert out.stdout == expected + "\n", "the command printed another summary"
            return run

        rows: dict[str, Callable[[], Any]] = {
            "command": command("-m", "layerscope"),
            "eager": command("-c", EAGER),
            "in process": lambda: format_summary(summarize(store)),
            "python": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
        }
        for action in rows.values():  # warm: the page cache and the imports of this process
            action()
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.trials):
            for name, action in rows.items():
                times[name].append(seconds(action))
        median = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()[0]
    print(f"layerscope info, {arrays} arrays, median of {args.trials} (load average {load:.1f})")
    print(f"  as a command (python -m layerscope info): {median['command']:.3f} s")
    print(f"  the same, everything imported first:      {median['eager']:.3f} s "
          f"({median['eager'] / median['command']:.1f}x the command)")
    print(f"  in the process (summarize + format):      {median['in process']:.3f} s")
    print(f"  python -c pass (Python's start alone):    {median['python']:.3f} s")


if __name__ == "__main__":
    main()
